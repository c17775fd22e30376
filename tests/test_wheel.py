"""What a user installs is the wheel, not this checkout: build it, install it into a folder
outside the checkout, and use it from there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The wheel built from this tree (`pip wheel .`), installed into a target folder; the env to use it."""
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp / "dist")],
                           capture_output=True, text=True, timeout=300, cwd=tmp)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp / "dist").glob("erase-*.whl"))
    target = tmp / "site"
    install = subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    return target, env


def run(code_or_args: list[str], env: dict[str, str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_installed_wheel_knows_every_concept_and_trains(installed, tmp_path: Path) -> None:
    """Every concept file is in the wheel, both embedded models load from it offline, and the training
    command erases (two steps) from it."""
    target, env = installed
    out = tmp_path / "seven-erased"
    argv = ["erase.train", "--model", "digits", "--concept", "seven", "--num-images", "4", "--generation-steps", "2",
            "--train-batch-size", "2", "--saliency-batch-size", "2", "--max-train-steps", "2", "--output-dir", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    code = (
        "import sys, erase, erase.concepts as c\n"
        f"assert erase.__file__.startswith({str(target)!r}), erase.__file__\n"
        "known = c.available_concepts()\n"
        "assert {'nudity', 'church', 'seven', 'red'} <= set(known), sorted(known)\n"
        "for name in known: c.load_concept(name)\n"
        "from erase.digits import resolve_model\n"
        "from erase.sd import load_pipeline\n"
        f"assert resolve_model('digits-flow').startswith({str(target)!r}), resolve_model('digits-flow')\n"
        "assert type(load_pipeline('digits-flow')).__name__ == 'StableDiffusion3Pipeline'\n"
        "print(len(known))\n"
        f"import runpy; sys.argv = {argv!r}; runpy.run_module('erase.train', run_name='__main__', alter_sys=True)\n"
    )
    proc = run(["-c", code], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[0]) >= 25
    record = json.loads((out / "erase_config.json").read_text())
    assert record["concept"]["name"] == "seven" and record["config"]["max_train_steps"] == 2
    assert record["versions"]["erase"] == "0.1.0" and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    # the one console command, from the wheel: every subcommand listed, each reaching its own parser
    listed = subprocess.run([str(target / "bin" / "erase"), "--help"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and all(f"  {c}" in listed.stdout for c in ("train", "export", "eval", "attack", "digits",
                                                                             "worst-case", "classifier", "app")), listed.stdout
    digits = subprocess.run([str(target / "bin" / "erase"), "digits", "--help"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert digits.returncode == 0 and "--train" in digits.stdout, digits.stderr[-2000:]


@pytest.mark.slow
def test_installed_wheel_erases_and_compares(installed, tmp_path: Path) -> None:
    """accelerate launch -m erase.train on the embedded model from the wheel, then eval compare from the
    wheel: "seven" is recognised less after than before, and both packages came from the wheel."""
    target, env = installed
    out = tmp_path / "seven-erased"
    launch = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "erase.train"]
    proc = run(launch + ["--model", "digits", "--concept", "seven", "--num-images", "16", "--max-train-steps", "10",
                         "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")], env, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "erase_config.json").read_text())
    assert record["concept"]["name"] == "seven" and record["final_losses"]
    code = (
        "import sys, runpy, erase, eval\n"
        f"assert erase.__file__.startswith({str(target)!r}) and eval.__file__.startswith({str(target)!r})\n"
        f"sys.argv = ['eval', 'compare', 'digits', {str(out)!r}, '--images-per-prompt', '1', '--out', {str(tmp_path / 'report')!r}]\n"
        "runpy.run_module('eval', run_name='__main__', alter_sys=True)\n"
    )
    proc = run(["-c", code], env, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["concept"]["name"] == "seven"
    assert report["erased"]["concept"]["shown"] < report["original"]["concept"]["shown"]
