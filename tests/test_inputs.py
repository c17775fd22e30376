"""Every command checks its input before it loads a model or generates an image: a bad input ends
in seconds with one `error:` line, exit status 2, and nothing written; a failure at run time is one
line and exit status 1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = "a-file"  # a file where a folder would have to be: not writable, even for root


def call(main, argv: list[str], capsys) -> tuple[int, str]:
    """Run a command's main in-process; argparse errors exit, the rest return a status."""
    try:
        rc = main(argv)
    except SystemExit as stop:
        rc = stop.code
    return rc, capsys.readouterr().err


def train_main(argv):
    from erase.train import main

    return main(argv)


def worst_case_main(argv):
    from erase.worst_case.cli import main

    return main(argv)


def eval_main(argv):
    from eval.__main__ import main

    return main(argv)


def classifier_main(argv):
    from erase.classifier.__main__ import main

    return main(argv)


def digits_main(argv):
    from erase.digits.__main__ import main

    return main(argv)


def export_main(argv):
    from erase.export.__main__ import main

    return main(argv)


def app_main(argv):
    import app

    return app.main(argv)


def train_args(model: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--concept", "nudity", "--num-images", "2", "--generation-steps", "1",
            "--max-train-steps", "1", "--output-dir", str(out / "erased"), "--cache-dir", str(out / "cache")]


CASES = [
    # (command, arguments given the tiny model and the output folder, words of the error)
    (train_main, lambda m, o: train_args(m, o) + ["--learning-rate", "-1"], "learning-rate must be positive"),
    (train_main, lambda m, o: train_args(m, o)[2:4] + ["--forget-prompt", ""] + train_args(m, o)[4:] + ["--model", str(m)],
     "forget-prompt must not be empty"),
    (train_main, lambda m, o: train_args(m, o) + ["--model", "/does/not/exist"], "model folder not found"),
    (train_main, lambda m, o: train_args(m, o) + ["--resolution", "30"], "multiple of 8"),
    (train_main, lambda m, o: train_args(m, o) + ["--mask", str(o / "missing.safetensors")], "mask file not found"),
    (train_main, lambda m, o: train_args(m, o) + ["--resume-from-checkpoint", str(o / "nope")], "checkpoint folder not found"),
    (train_main, lambda m, o: train_args(m, o) + ["--output-dir", str(o / BLOCKER / "out")], "cannot write the output"),
    (train_main, lambda m, o: train_args(m, o) + ["--generation-steps", "0"], "generation-steps must be positive"),
    (train_main, lambda m, o: train_args(m, o) + ["--method", "rl", "--mask-ratio", "0.3"], "apply to salun only"),
    (train_main, lambda m, o: train_args(m, o) + ["--mask", str(o / BLOCKER)], "is not a readable safetensors file"),
    (train_main, lambda m, o: train_args(m, o) + ["--max-train-steps", "0"], "max-train-steps must be >= 1"),
    (train_main, lambda m, o: train_args(m, o) + ["--learning-rate", "x"], "invalid float value"),
    (train_main, lambda m, o: train_args(m, o) + ["--adversarial", "--adversarial-vectors", "0"], "adversarial-vectors must be >= 1"),
    (train_main, lambda m, o: train_args(m, o) + ["--adversarial", "--adversarial-steps", "-2"], "adversarial-steps must be >= 1"),
    (train_main, lambda m, o: train_args(m, o) + ["--adversarial", "--adversarial-pool", "-1"], "adversarial-pool must be >= 0"),
    (train_main, lambda m, o: train_args(m, o) + ["--adversarial", "--adversarial-trains", "both", "--adversarial-pool", "0"],
     "it takes --adversarial-pool 1"),
    (train_main, lambda m, o: train_args(m, o) + ["--adversarial", "--method", "uce"], "uce has no training loop"),
    (train_main, lambda m, o: train_args(m, o) + ["--adversarial-trains", "both"], "applies to --adversarial salun and rl"),
    (train_main, lambda m, o: train_args(m, o) + ["--adversarial", "--method", "esd-x", "--adversarial-trains", "text-encoder"],
     "applies to --adversarial salun and rl"),
    (train_main, lambda m, o: train_args(m, o) + ["--adversarial", "--adversarial-trains", "both", "--optimizer-state", "masked"],
     "does not train text encoders"),
    # options the run would not use are refused, not ignored (the table in docs/options.md)
    (train_main, lambda m, o: train_args(m, o) + ["--uce-lambda", "0.2"], "--uce-lambda applies to uce, not salun"),
    (train_main, lambda m, o: train_args(m, o) + ["--eta", "2"], "--eta applies to esd-x and esd-u, not salun"),
    (train_main, lambda m, o: train_args(m, o) + ["--adversarial-vectors", "8"], "applies with --adversarial only"),
    (train_main, lambda m, o: train_args(m, o) + ["--adversarial-mask", "both"], "applies with --adversarial only"),
    (train_main, lambda m, o: train_args(m, o)[:-4] + ["--method", "uce", "--optimizer-state", "masked"], "uce edits in closed form"),
    (train_main, lambda m, o: train_args(m, o)[:-4] + ["--method", "uce", "--learning-rate", "1e-4"], "uce edits in closed form"),
    (train_main, lambda m, o: train_args(m, o) + ["--method", "uce"], "--max-train-steps applies to the methods that train"),
    (eval_main, lambda m, o: ["attack", "--model", str(m), "--original", str(m), "--attack", "unlearndiffatk", "--concept", "seven",
                              "--preset", "pham", "--out", str(o / "a.json")], "--preset pham is a protocol of the inversion attack"),
    (eval_main, lambda m, o: ["attack", "--model", str(m), "--original", str(m), "--attack", "inversion", "--concept", "seven",
                              "--k", "3", "--out", str(o / "a.json")], "--k applies to the unlearndiffatk attack, not inversion"),
    (eval_main, lambda m, o: ["attack", "--model", str(m), "--original", str(m), "--attack", "unlearndiffatk", "--concept", "seven",
                              "--inversion-vectors", "4", "--out", str(o / "a.json")], "applies to the inversion attack"),
    (digits_main, lambda m, o: ["--train", "--max-train-steps", "0", "--output-dir", str(o / "d")], "must be >= 1"),
    (digits_main, lambda m, o: [], "nothing to do"),
    (train_main, lambda m, o: train_args(m, o) + ["--method", "esd-x", "--mask", str(o / BLOCKER)], "apply to salun only"),
    (worst_case_main, lambda m, o: ["--size", "2.0", "--out", str(o / "w.json")], "--size '2.0'"),
    (worst_case_main, lambda m, o: ["--target", "prompt", "--model", "/does/not/exist", "--out", str(o / "w.json")],
     "model folder not found"),
    (worst_case_main, lambda m, o: ["--outer-steps", "-1", "--out", str(o / "w.json")], "outer_steps must be >= 0"),
    (worst_case_main, lambda m, o: ["--w-lr", "0", "--out", str(o / "w.json")], "w_lr"),
    (worst_case_main, lambda m, o: ["--out", str(o / BLOCKER / "out")], "cannot write the output"),
    (eval_main, lambda m, o: ["compare", "digits", "/does/not/exist", "--out", str(o / "r")], "erased folder not found"),
    (eval_main, lambda m, o: ["compare", "/does/not/exist", str(m), "--out", str(o / "r")], "original folder not found"),
    (eval_main, lambda m, o: ["compare", "digits", str(m), "--out", str(o / BLOCKER / "out")], "cannot write the report"),
    (eval_main, lambda m, o: ["compare", "digits", str(m), "--out", str(o / BLOCKER)], "is a file"),
    (eval_main, lambda m, o: ["compare", "digits", str(m), "--out", "/proc/report"], "/proc is not a writable folder"),
    (eval_main, lambda m, o: ["classes", "--model", "digits", "--images-per-prompt", "0", "--out", str(o / "c.json")],
     "images-per-prompt must be positive"),
    (eval_main, lambda m, o: ["classes", "--model", "digits", "--steps", "-3", "--out", str(o / "c.json")],
     "steps must be positive"),
    (eval_main, lambda m, o: ["nudity", "--images", str(o / "none"), "--out", str(o / "n.json")], "image folder not found"),
    (eval_main, lambda m, o: ["nudity", "--model", str(m), "--prompts", str(o / "none.csv"), "--out", str(o / "n.json")],
     "prompts file not found"),
    (eval_main, lambda m, o: ["fid", "--model", str(m), "--reference", str(o / "none"), "--out", str(o / "f.json")],
     "image folder not found"),
    (eval_main, lambda m, o: ["attack", "--model", "/does/not/exist", "--original", "digits", "--attack", "inversion",
                              "--out", str(o / "a.json")], "model folder not found"),
    (eval_main, lambda m, o: ["attack", "--model", str(m), "--original", "digits", "--attack", "unlearndiffatk", "--k", "0", "--concept", "seven",
                              "--out", str(o / "a.json")], "k must be positive"),
    (eval_main, lambda m, o: ["attack", "--model", str(m), "--original", str(m), "--attack", "inversion", "--concept",
                              "nope", "--out", str(o / "a.json")], "unknown concept"),
    (eval_main, lambda m, o: ["attack", "--model", str(m), "--original", str(m), "--attack", "inversion",
                              "--out", str(o / "a.json")], "pass --concept"),
    (eval_main, lambda m, o: ["attack", "--model", str(m), "--original", str(m), "--attack", "unlearndiffatk", "--concept",
                              "seven", "--deciding-threshold", "unlearndiffatk_0.45", "--out", str(o / "a.json")], "no threshold"),
    (eval_main, lambda m, o: ["attack", "--model", str(m), "--original", str(m), "--attack", "inversion", "--concept", "seven",
                              "--inversion-vectors", "0", "--out", str(o / "a.json")], "inversion-vectors must be positive"),
    (eval_main, lambda m, o: ["attack", "--model", str(m), "--original", str(m), "--attack", "gcg", "--out",
                              str(o / "a.json")], "invalid choice"),
    (eval_main, lambda m, o: ["attack", "--model", str(m), "--original", str(m), "--attack", "inversion",
                              "--concept", "seven", "--out", str(o / BLOCKER / "a.json")], "cannot write the report"),
    (classifier_main, lambda m, o: ["--forget", "random:1.5", "--out", str(o / "c.json")], "cannot parse forget set"),
    (classifier_main, lambda m, o: ["--lr", "-1", "--out", str(o / "c.json")], "lr must be > 0"),
    (classifier_main, lambda m, o: ["--out", str(o / BLOCKER / "out")], "cannot write the report"),
    (app_main, lambda m, o: ["--original", "digits", "--erased", "/does/not/exist", "--labels", "none"],
     "erased model folder not found"),
    (export_main, lambda m, o: [str(m), "--format", "lora", "--rank", "0", "--out", str(o / "x.safetensors")], "rank must be"),
]


@pytest.mark.parametrize("main, argv, message", CASES, ids=[f"{c[0].__name__.removesuffix('_main')}: {c[2]}" for c in CASES])
def test_bad_input_fails_fast_with_one_line(main, argv, message: str, tiny_sd_path: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / BLOCKER).write_text("")
    before = sorted(tmp_path.rglob("*"))
    start = time.perf_counter()
    rc, err = call(main, argv(tiny_sd_path, tmp_path), capsys)
    seconds = time.perf_counter() - start
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err[-2000:]
    assert seconds < 5, f"{seconds:.1f} s before the error: work was done before the input was checked"
    assert sorted(tmp_path.rglob("*")) == before, "something was written"


def test_a_bad_input_is_one_line_from_a_fresh_process(tmp_path: Path) -> None:
    """The same through the real entry point: no import-time notes, exactly one line, in seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "eval", "compare", "digits", str(tmp_path / "none"), "--out", str(tmp_path / "r")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: erased folder not found")
    assert time.perf_counter() - start < 30 and not list(tmp_path.iterdir())


def test_an_error_after_the_libraries_load_is_one_line_from_a_fresh_process(tiny_sd_path: Path, tmp_path: Path) -> None:
    """An attack on a folder that erased two concepts must be told which: the libraries are loaded
    by then, and their import-time notes (torchvision missing) must not reach stderr."""
    import json
    import shutil

    erased = tmp_path / "two"
    shutil.copytree(tiny_sd_path, erased)
    (erased / "erase_config.json").write_text(json.dumps({"concept": {"name": "seven+red"},
                                                          "concepts": [{"name": "seven"}, {"name": "red"}]}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    proc = subprocess.run([sys.executable, "-m", "eval", "attack", "--model", str(erased), "--original", str(tiny_sd_path),
                           "--attack", "inversion", "--out", str(tmp_path / "a.json")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr == f"error: {erased} erased 2 concepts (seven, red): pass --concept NAME to attack one\n"
    assert not (tmp_path / "a.json").exists()


def test_compare_refuses_an_unsupported_erased_model_before_generating(tiny_sd_path: Path, tmp_path: Path, capsys) -> None:
    """The erased model's kind is read from its model_index.json before the original's images are made."""
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_sd_path, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps(index | {"_class_name": "KandinskyPipeline"}))
    (tmp_path / "prompts.txt").write_text("a cat\n")
    start = time.perf_counter()
    rc, err = call(eval_main, ["compare", str(tiny_sd_path), str(other), "--prompts", str(tmp_path / "prompts.txt"),
                               "--metrics", "nudity", "--out", str(tmp_path / "report")], capsys)
    assert rc not in (0, None) and "is a KandinskyPipeline; supported" in err, err
    assert time.perf_counter() - start < 5 and not (tmp_path / "report").exists()


def test_a_failure_at_run_time_is_one_line_and_exit_1(tiny_sd_path: Path, tmp_path: Path, capsys) -> None:
    """Inception FID needs torch-fidelity, which is not installed here: found when the metric is built."""
    pytest.importorskip("torch")
    try:
        import torch_fidelity  # noqa: F401

        pytest.skip("torch-fidelity is installed")
    except ImportError:
        pass
    rc, err = call(eval_main, ["fid", "--model", str(tiny_sd_path), "--reference-model", str(tiny_sd_path), "--prompts",
                               str(ROOT / "prompts" / "README.md"), "--features", "inception", "--out", str(tmp_path / "f.json")],
                   capsys)
    assert rc == 1 and err.count("\n") == 1 and err.startswith("error:"), err
    assert not (tmp_path / "f.json").exists()


def test_compare_asked_for_inception_fid_without_torch_fidelity_exits_1_before_generating(tiny_sd_path: Path, tmp_path: Path,
                                                                                         monkeypatch, capsys) -> None:
    """A report that asks for FID is not written without it (it said "fid: skipped" and exited 0)."""
    from eval import fid

    monkeypatch.setattr(fid, "inception_available", lambda: False)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    start = time.perf_counter()
    rc, err = call(eval_main, ["compare", str(tiny_sd_path), str(tiny_sd_path), "--prompts", str(tmp_path / "prompts.txt"),
                               "--metrics", "nudity,fid", "--out", str(tmp_path / "report")], capsys)
    assert rc == 1 and err.count("\n") == 1 and "pip install 'erase[fid]'" in err, err
    assert time.perf_counter() - start < 5 and not (tmp_path / "report").exists()


def test_a_typo_in_a_concepts_recipe_is_refused(monkeypatch, tmp_path: Path, capsys) -> None:
    """A concept file's `train:` recipe (and its `adversarial:` part) takes erase/train.py's options; an
    unknown key was dropped without a word."""
    import dataclasses

    import erase.train
    from erase.concepts import load_concept

    seven = load_concept("seven")
    for typo in ({"learnig_rate": 1e-3}, {"adversarial": {"betta": 3.0}}):
        monkeypatch.setattr(erase.train, "load_concept", lambda name, typo=typo: dataclasses.replace(seven, train={**seven.train, **typo}))
        rc, err = call(train_main, ["--model", "digits", "--concept", "seven", "--output-dir", str(tmp_path / "o")], capsys)
        key = next(iter(typo["adversarial"] if "adversarial" in typo else typo))
        assert rc == 2 and f"unknown option {key!r} in its train: recipe" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_a_launch_that_lost_its_processes_refuses(tmp_path: Path, monkeypatch, capsys) -> None:
    """Two processes started without the CPU setting each run as process 0 of 1: both would write."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, err = call(eval_main, ["classes", "--model", "digits", "--out", str(tmp_path / "c.json")], capsys)
    assert rc == 2 and err.strip() == "error: launched as 2 processes but running as 1 (no GPU here: set ACCELERATE_USE_CPU=1)"
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("main, argv", [
    (train_main, ["--help"]), (worst_case_main, ["--help"]), (classifier_main, ["--help"]), (digits_main, ["--help"]),
    (app_main, ["--help"]), (export_main, ["--help"]),
    *[(eval_main, [command, "--help"]) for command in ("classes", "nudity", "fid", "compare", "attack")],
], ids=lambda v: v.__name__.removesuffix("_main") if callable(v) else " ".join(v))
def test_every_command_has_help(main, argv, capsys) -> None:
    try:
        main(argv)
    except SystemExit as stop:
        assert stop.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out
