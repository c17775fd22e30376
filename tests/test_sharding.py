"""Sharded erasure (`--fsdp`, FSDP2 over gloo here): 2 processes against 1, resume, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from erase.saliency import load_mask

from conftest import free_port
from test_train import ENV, TRAIN, run_train, small_run, weights

ROOT = Path(__file__).resolve().parents[1]


def launch(processes: int) -> list[str]:
    """`accelerate launch` of `processes` CPU processes, their rendezvous on a port free now."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]


def test_sharded_topk_is_the_one_process_mask(tmp_path: Path) -> None:
    """The global threshold over shards (two histograms summed over processes) and the ties taken in
    the whole tensors' order, with uneven and empty shards."""
    out = tmp_path / "topk.json"
    proc = subprocess.run(launch(2) + [str(ROOT / "tests" / "fsdp_topk_script.py"), str(out)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["world"] == 2
    for ratio, r in found["results"].items():
        assert r["bits_differ"] == 0, ratio
        assert r["fraction"][0] == r["fraction"][1]
        assert r["moving"][0] == r["moving"][1]


def compare(one: Path, sharded: Path) -> float:
    """Same mask to the bit; the largest weight difference between the two runs."""
    m1, m2 = load_mask(one / "saliency_mask.safetensors"), load_mask(sharded / "saliency_mask.safetensors")
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    a, b = weights(one, "unet"), weights(sharded, "unet")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def check_sharding_record(folder: Path, one: Path) -> None:
    """Each of the 2 processes holds half of the UNet's parameter, gradient and optimizer bytes."""
    one_process_optimizer = json.loads((one / "erase_config.json").read_text())["optimizer"]["state_bytes"]
    record = json.loads((folder / "erase_config.json").read_text())
    assert record["config"]["fsdp"] and record["num_processes"] == 2
    sharding = record["sharding"]
    assert sharding["processes"] == 2
    whole = sharding["unsharded_bytes"]
    for each in sharding["per_process_bytes"]:
        assert abs(each["parameters"] / whole["parameters"] - 0.5) < 0.01
        assert abs(each["gradients"] / whole["gradients"] - 0.5) < 0.01
        assert abs(each["optimizer"] / one_process_optimizer - 0.5) < 0.01


def kill_tree(proc: subprocess.Popen) -> None:
    parent = psutil.Process(proc.pid)
    for child in parent.children(recursive=True):
        child.kill()
    parent.kill()
    proc.wait()


def test_two_sharded_processes_match_one_and_resume_after_kill(tiny_sd_path: Path, tmp_path: Path, capsys) -> None:
    """2 FSDP processes with 2 micro-batches against 1 process with 4 (the same batches), adversarial
    (every process runs the inner attack through the sharded UNet): the same mask, the same vectors,
    the weights within float reduction order. The uninterrupted run goes through Accelerate's FSDP
    plugin route, the killed one through --fsdp: resumed, the same weights to the bit (the plugin's
    gradient accumulation held the sync back and summed in another order: 225,001 weights differed).
    A sharded checkpoint or mask is refused elsewhere."""
    args = lambda out, *extra: ["--concept", "nudity", *small_run(tiny_sd_path, out, tmp_path / "cache"),
                                "--max-train-steps", "12", "--checkpointing-steps", "4",
                                "--adversarial", "--adversarial-every", "3", "--adversarial-steps", "2", "--adversarial-pool", "2", *extra]
    one = run_train(args(tmp_path / "one", "--gradient-accumulation-steps", "4"))
    assert one.returncode == 0, one.stderr[-3000:]
    plugin = launch(2) + [str(ROOT / "tests" / "fsdp_plugin_train.py")]
    full = subprocess.run(plugin + args(tmp_path / "full", "--fsdp", "--gradient-accumulation-steps", "2"), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    assert compare(tmp_path / "one", tmp_path / "full") < 1e-4
    attacked = [json.loads((tmp_path / run / "erase_config.json").read_text())["adversarial"]["last_attack_loss"] for run in ("one", "full")]
    assert attacked[0] == pytest.approx(attacked[1], rel=1e-4)
    check_sharding_record(tmp_path / "full", tmp_path / "one")
    original, mask = weights(tiny_sd_path, "unet"), load_mask(tmp_path / "full" / "saliency_mask.safetensors")
    after = weights(tmp_path / "full", "unet")
    assert all(torch.equal(after[k][~mask[k]], original[k][~mask[k]]) for k in mask)  # masked-out weights untouched
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "full").unet.state_dict()  # a plain diffusers folder
    assert all(torch.equal(loaded[k], after[k]) for k in after)

    killed = tmp_path / "killed"
    checkpoint = tmp_path / ".killed.partial" / "checkpoints" / "checkpoint-4"
    proc = subprocess.Popen(launch(2) + [TRAIN, *args(killed, "--fsdp", "--gradient-accumulation-steps", "2")], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not checkpoint.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(proc)
    assert not killed.exists(), "the run finished before it could be killed"
    shards = [f"{w}.rank{r}-of-2.safetensors" for w in ("optimizer", "unet") for r in (0, 1)]
    assert sorted(p.name for p in checkpoint.iterdir()) == ["adversarial.safetensors", *shards]

    unsharded = run_train(args(killed, "--gradient-accumulation-steps", "2", "--resume-from-checkpoint", str(checkpoint)))
    assert unsharded.returncode != 0 and "written by a sharded run" in unsharded.stderr
    shard = tmp_path / ".killed.partial" / "saliency_mask.rank1-of-2.safetensors"
    foreign = run_train(args(tmp_path / "other", "--mask", str(shard)))
    assert foreign.returncode != 0 and "one process's rows" in foreign.stderr and not (tmp_path / "other").exists()

    resumed = run_train(args(killed, "--fsdp", "--gradient-accumulation-steps", "2", "--resume-from-checkpoint", "latest"),
                        launcher=launch(2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((killed / "erase_config.json").read_text())["resumed_from"].endswith("checkpoint-4")
    assert compare(tmp_path / "full", killed) == 0.0


@pytest.mark.parametrize("family, extra", [("sd2", ["--method", "esd-x"]),
                                           ("sdxl", ["--optimizer-state", "masked", "--mixed-precision", "bf16"])])
def test_sharded_families_match_one_process(family: str, extra: list[str], tiny_family_paths: dict, tmp_path: Path) -> None:
    """SD 2.x (ESD's sharded teacher) in fp32: the one-process mask and weights. SDXL (Adam's moments
    for the mask's entries only) in bf16, where the two runs' gradients differ in their last bits: a
    mask within 3% of the bits, and every tensor the mask lets move has moved (under autocast's cast
    cache, SalUn's no-grad anchor pass left the sharded units without gradients)."""
    args = lambda out, *more: ["--concept", "nudity", *small_run(tiny_family_paths[family], out, tmp_path / "cache"), *extra, *more]
    one = run_train(args(tmp_path / "one", "--gradient-accumulation-steps", "2"))
    assert one.returncode == 0, one.stderr[-3000:]
    sharded = run_train(args(tmp_path / "sharded", "--fsdp"), launcher=launch(2))
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    check_sharding_record(tmp_path / "sharded", tmp_path / "one")
    if "bf16" not in extra:
        assert compare(tmp_path / "one", tmp_path / "sharded") < 1e-4
        return
    m1, m2 = load_mask(tmp_path / "one" / "saliency_mask.safetensors"), load_mask(tmp_path / "sharded" / "saliency_mask.safetensors")
    # the sharded run gathers bf16 parameters (FSDP2's MixedPrecisionPolicy: norms run in bf16 too), the
    # one-process run casts fp32 weights under autocast: measured 24,738 of 1,360,740 bits differ (1.8%; 2,746 = 0.2% before the policy)
    assert sum(int((m1[k] != m2[k]).sum()) for k in m1) <= 0.03 * sum(m.numel() for m in m1.values())
    before, after = weights(tiny_family_paths[family], "unet"), weights(tmp_path / "sharded", "unet")
    assert all(not torch.equal(before[k], after[k]) for k, m in m2.items() if bool(m.any())), "a trainable tensor never moved"


@pytest.mark.parametrize("extra, message", [
    (["--method", "uce"], "uce has no training loop"),
    (["--adversarial", "--adversarial-trains", "both"], "is not sharded (use --adversarial-trains unet)"),
    (["--mixed-precision", "fp16"], "use bf16"),
    ([], "launch 2 or more"),
])
def test_what_fsdp_cannot_shard_is_refused_before_loading(extra: list[str], message: str, tiny_sd_path: Path, tmp_path: Path,
                                                          monkeypatch) -> None:
    import erase.train

    monkeypatch.setattr(erase.train, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    proc = run_train(["--concept", "nudity", "--model", str(tiny_sd_path), "--output-dir", str(out), "--fsdp", *extra])
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_accelerates_fsdp_plugin_selects_sharding_and_must_be_fsdp2() -> None:
    """`accelerate launch --use_fsdp` (distributed type FSDP) shards as --fsdp does; FSDP1 is refused."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from erase.command import BadInput
    from erase.sharding import sharding_of

    cfg = SimpleNamespace(fsdp=False, method="salun", adversarial=False, mixed_precision="bf16")
    plugin = lambda version: SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2,
                                             state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))
    assert sharding_of(cfg, plugin(2))
    with pytest.raises(BadInput, match="fsdp_version 2"):
        sharding_of(cfg, plugin(1))
    assert not sharding_of(cfg, SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, num_processes=2))


def test_masked_adam_state_resumes_on_sharded_parameters(tmp_path: Path) -> None:
    """MaskedAdam's packed moments come back as plain tensors, also where a process's rows of a tensor are
    all in the mask (the moment then has the local shape: re-wrapped as a DTensor, the first step mixed
    Tensor and DTensor and failed); 2 + 2 steps equal 4 to the bit, under rl's mask and salun's."""
    out = tmp_path / "resume.json"
    proc = subprocess.run(launch(2) + [str(ROOT / "tests" / "fsdp_masked_resume_script.py"), str(out)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["world"] == 2 and set(found["modes"]) == {"rl", "salun"}
    for mode, result in found["modes"].items():
        assert result["equal"] == [True, True] and result["moved"] == [True, True], mode
