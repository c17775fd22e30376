"""erase/train.py on a tiny random pipeline: mechanics, contracts, resume, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erase.saliency import load_mask

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "erase" / "train.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}


def small_run(model: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--num-images", "4", "--generation-steps", "2", "--train-batch-size", "2",
        "--saliency-batch-size", "2", "--max-train-steps", "3", "--learning-rate", "1e-3",
        "--output-dir", str(out), "--cache-dir", str(cache), *extra,
    ]


# the small-run flags the test helpers pass to every method; erase/train.py refuses the ones a method does not use
SHARED_FLAGS = {"--saliency-batch-size", "--beta", "--num-images", "--generation-steps", "--train-batch-size", "--max-train-steps",
                "--learning-rate", "--cache-dir", "--resolution", "--checkpointing-steps"}


def for_method(args: list[str]) -> list[str]:
    """`args` less the shared small-run flags that the run's method would refuse (docs/options.md)."""
    import dataclasses

    from erase.erasure import TrainConfig

    method = args[args.index("--method") + 1] if "--method" in args else "salun"
    methods = {"--" + f.name.replace("_", "-"): f.metadata.get("methods") for f in dataclasses.fields(TrainConfig)}
    out, i = [], 0
    while i < len(args):
        if args[i] in SHARED_FLAGS and methods[args[i]] and method not in methods[args[i]]:
            i += 2  # the flag and its value
            continue
        out.append(args[i])
        i += 1
    return out


def run_train(args: list[str], launcher: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """erase/train.py with `args` (the shared small-run flags kept where the method uses them): under
    `launcher` in its own process(es), else in this process (the same main, without the seconds of
    importing torch and diffusers again)."""
    args = for_method(args)
    if launcher is None:
        return train_in_process(args)
    cmd = launcher + [TRAIN, *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def train_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """`erase.train.main(args)` with its stdout, stderr and log records captured, on a fresh
    Accelerate state (a run may ask for another mixed precision than the last one)."""
    import contextlib
    import io
    import logging

    from accelerate.state import AcceleratorState, GradientState

    from erase.train import main

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    saved = {k: os.environ.get(k) for k in ("ACCELERATE_USE_CPU",)}
    os.environ["ACCELERATE_USE_CPU"] = "1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as ENV's OMP_NUM_THREADS=1 gives a subprocess: the same float reductions as one
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(args))
            except SystemExit as stop:
                rc = stop.code
    finally:
        root.removeHandler(handler)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["erase/train.py", *args], rc, out.getvalue(), err.getvalue())


def weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    files = sorted((folder / component).glob("*.safetensors"))
    assert files, f"no safetensors in {folder / component}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def erased_nudity(tiny_sd_path: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("nudity")
    out = tmp / "out"
    proc = run_train(["--concept", "nudity", *small_run(tiny_sd_path, out, tmp / "cache")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_nudity_output_is_a_complete_pipeline(erased_nudity: Path, tiny_sd_path: Path) -> None:
    for name in ["model_index.json", "erase_config.json", "saliency_mask.safetensors", "unet", "vae", "text_encoder", "tokenizer", "scheduler"]:
        assert (erased_nudity / name).exists(), name
    assert not list(erased_nudity.parent.glob(".*partial*"))
    record = json.loads((erased_nudity / "erase_config.json").read_text())
    assert record["config"]["method"] == "salun" and record["config"]["concept"] == ["nudity"]
    assert record["concept"]["forget"] == ["a photo of a nude person"]
    assert record["versions"]["diffusers"] and record["num_processes"] == 1


def test_masked_out_weights_and_frozen_modules_unchanged(erased_nudity: Path, tiny_sd_path: Path) -> None:
    before, after = weights(tiny_sd_path, "unet"), weights(erased_nudity, "unet")
    from diffusers import UNet2DConditionModel

    mask = load_mask(erased_nudity / "saliency_mask.safetensors", UNet2DConditionModel.from_pretrained(tiny_sd_path / "unet"))
    changed = 0
    for name, m in mask.items():
        assert torch.equal(after[name][~m], before[name][~m]), f"{name}: a masked-out weight moved"
        changed += int((after[name][m] != before[name][m]).sum())
    assert changed > 0.5 * sum(int(m.sum()) for m in mask.values())
    assert abs(sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values()) - 0.5) < 1e-6
    for component in ["vae", "text_encoder"]:
        a, b = weights(tiny_sd_path, component), weights(erased_nudity, component)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component


def assert_loads_without_the_project(folder: Path, loader: str = "StableDiffusionPipeline", checks: str = "") -> None:
    """`loader.from_pretrained(folder)` in a fresh interpreter that never imports this project
    generates a 16x16 image; `checks` are extra lines of Python run there on `pipe`."""
    code = (
        "import sys, torch\n"
        f"from diffusers import {loader}\n"
        f"pipe = {loader}.from_pretrained({str(folder)!r})\n"
        + checks +
        "img = pipe('a photo of a nude person', num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]\n"
        "assert img.size == (16, 16)\n"
        "assert not any(m == 'erase' or m.startswith('erase.') for m in sys.modules), 'project imported'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_output_loads_in_a_process_that_never_imports_the_project(erased_nudity: Path) -> None:
    assert_loads_without_the_project(erased_nudity)


def test_generated_sets_are_cached_and_reused(erased_nudity: Path) -> None:
    cache = erased_nudity.parent / "cache" / "images"
    sets = sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(sets) == 2  # forget and retain
    index = json.loads((sets[0] / "index.json").read_text())
    assert {"prompts", "seeds", "model", "steps", "guidance"} <= set(index)
    stamps = {p: p.stat().st_mtime_ns for s in sets for p in s.iterdir()}
    proc = run_train(["--concept", "nudity", "--overwrite", *small_run(Path(index["model"]), erased_nudity, cache.parent)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for s in sets for p in s.iterdir()} == stamps


@pytest.mark.parametrize("method, touched", [("esd-x", "attn2"), ("esd-u", "not attn2")])
def test_esd_trains_its_subset(method: str, touched: str, tiny_sd_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_train(["--concept", "church", "--method", method, *small_run(tiny_sd_path, out, tmp_path / "cache")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = weights(tiny_sd_path, "unet"), weights(out, "unet")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved
    if touched == "attn2":
        assert all(".attn2." in k for k in moved)
    else:
        assert not any(".attn2." in k for k in moved)


def kill_after_checkpoint(args: list[str], out: Path, step: int = 2) -> None:
    """erase/train.py with `args` in its own process, killed (SIGKILL) once checkpoint-`step` is written."""
    checkpoints = out.parent / f".{out.name}.partial" / "checkpoints"
    proc = subprocess.Popen([sys.executable, TRAIN, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (checkpoints / f"checkpoint-{step}").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed"


@pytest.mark.parametrize("family", ["sd1", "sd1-adversarial", "sdxl"])
def test_resume_after_kill_matches_uninterrupted_run(family: str, request, tmp_path: Path) -> None:
    """Killed after a checkpoint and resumed: the same weights as the uninterrupted run. SD 1.x with
    Adam's moments for the mask's entries only (a checkpoint that dropped them restarts Adam); adversarial
    (dense state): rounds at steps 0, 3, 6, so a resume at 2 or 4 rebuilds the adversarial prompts from
    the saved vectors."""
    model = request.getfixturevalue("tiny_sd_path") if family.startswith("sd1") else request.getfixturevalue("tiny_family_paths")["sdxl"]
    common = ["--concept", "nudity", "--checkpointing-steps", "2"]
    if family == "sd1":
        common += ["--optimizer-state", "masked"]
    if family == "sd1-adversarial":
        common += ["--adversarial", "--adversarial-every", "3", "--adversarial-steps", "2", "--adversarial-vectors", "2",
                   "--adversarial-trains", "both"]  # the text encoder's weights and moments come back too
    args = lambda out: common + small_run(model, out, tmp_path / "cache") + ["--max-train-steps", "8"]
    full = run_train(args(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]

    killed_out = tmp_path / "killed"
    kill_after_checkpoint(args(killed_out), killed_out)
    resumed = run_train(args(killed_out) + ["--resume-from-checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((killed_out / "erase_config.json").read_text())
    assert record["resumed_from"] and "checkpoint-" in record["resumed_from"]
    for component in ("unet", "text_encoder"):
        a, b = weights(tmp_path / "full", component), weights(killed_out, component)
        assert all(torch.equal(a[k], b[k]) for k in a), component


@pytest.mark.parametrize("variant", [pytest.param([], marks=pytest.mark.slow),
                                     ["--adversarial", "--adversarial-mask", "both", "--adversarial-steps", "3", "--adversarial-trains", "both"]],
                         ids=["plain", "adversarial"])
def test_two_processes_equal_one_with_two_micro_batches(variant: list[str], tiny_sd_path: Path, tmp_path: Path) -> None:
    """2 processes against 1 process with 2 micro-batches: the same batches (one random stream per
    micro-batch of all processes), the same mask, the same weights. Adversarial, with the mask on
    clean + adversarial prompts and the text encoder trained too: every process runs the same inner
    attack, and the encoder's gradients are averaged as DDP averages the UNet's. (The plain run takes
    the same mask and loop code without the adversarial term: slow, to keep the default suite short.)"""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    for n, extra in [(1, ["--num_processes", "1"]), (2, ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())])]:
        out = tmp_path / f"out{n}"
        micro = ["--gradient-accumulation-steps", "2"] if n == 1 else []
        proc = run_train(["--concept", "nudity", *small_run(tiny_sd_path, out, tmp_path / "cache"), *variant, *micro], launcher=launch + extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((out / "erase_config.json").read_text())["num_processes"] == n
    masks = [load_mask(tmp_path / f"out{n}" / "saliency_mask.safetensors") for n in (1, 2)]
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    for component in ("unet", "text_encoder"):
        a, b = weights(tmp_path / "out1", component), weights(tmp_path / "out2", component)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, component


def test_processes_share_the_generation_within_a_short_collective_timeout(tiny_sd_path: Path, tmp_path: Path) -> None:
    """2 processes, no cache, --ddp-timeout 3: one process alone takes longer than that to generate the
    sets (40 + 40 images at 30 steps, ~5 s here). When the main process generated them alone, its peer
    waited in a barrier past the timeout and the run was aborted; now each process generates its share,
    the run completes, and the cache holds the same files, byte for byte, as a one-process run's."""
    from test_sharding import launch

    args = lambda out, cache, *more: ["--concept", "nudity", *small_run(tiny_sd_path, out, cache), "--num-images", "40",
                                      "--generation-steps", "30", "--max-train-steps", "1", *more]
    one = run_train(args(tmp_path / "one", tmp_path / "cache1"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_train(args(tmp_path / "two", tmp_path / "cache2", "--ddp-timeout", "3"), launcher=launch(2))
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "erase_config.json").read_text())["num_processes"] == 2
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    cached1, cached2 = files(tmp_path / "cache1"), files(tmp_path / "cache2")
    assert len(cached1) == 2 * 41 and cached1 == cached2  # 40 images and an index per set


def test_custom_concept_from_flags(tiny_sd_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_train(["--forget-prompt", "a red apple", "--anchor-prompt", "a green apple", "--retain-prompt", "a banana",
                      "--retain-prompt", "a pear", "--mask_ratio", "0.3", "--gradient_accumulation_steps", "2",
                      "--gradient-checkpointing", "--resume-from-checkpoint", "latest",
                      *small_run(tiny_sd_path, out, tmp_path / "cache")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "erase_config.json").read_text())
    assert record["concept"]["retain"] == ["a banana", "a pear"] and record["config"]["mask_ratio"] == 0.3
    # `latest` with nothing to resume says so, on stderr and in the record
    assert "found no checkpoint" in proc.stderr and record["resumed_from"] is None
    assert len(record["notes"]) == 1 and record["notes"][0].startswith("--resume-from-checkpoint latest found no checkpoint")
    assert record["config"]["gradient_accumulation_steps"] == 2 and record["config"]["gradient_checkpointing"]


def test_several_concepts_in_one_run(tiny_sd_path: Path, tmp_path: Path) -> None:
    """--concept repeated: D_f holds num-images of each concept with its own anchors, D_r only
    prompts that no concept forgets, and erase_config.json names each concept."""
    from accelerate import Accelerator

    from erase.concepts import load_concept
    from erase.erasure import TrainConfig, prepare_data
    from erase.sd import load_pipeline

    cfg = TrainConfig(concept=["seven", "red"], num_images=4, generation_steps=1, cache_dir=str(tmp_path / "cache"))
    seven, red = cfg.resolve_concepts()
    merged = cfg.resolve_concept()
    assert merged.name == "seven+red" and merged.forget == seven.forget + red.forget
    assert not set(merged.retain) & set(merged.forget) and set(merged.retain) < set(seven.retain) | set(red.retain)
    pipe = load_pipeline(str(tiny_sd_path))
    data = prepare_data(pipe, cfg, [seven, red], Accelerator(cpu=True))
    assert len(data.forget_latents) == 8 and len(data.retain_latents) == 4
    rows = data.prompt_embeds.hidden_states
    expected = [load_concept(c).anchor[i % len(load_concept(c).forget)] for c in ("seven", "red") for i in range(4)]
    from erase.sd import encode_prompts

    torch.testing.assert_close(rows[data.anchor_prompt], encode_prompts(pipe, expected).hidden_states)  # batched apart

    out = tmp_path / "out"
    proc = run_train(["--concept", "seven", "--concept", "red", "--method", "esd-x", *small_run(tiny_sd_path, out, tmp_path / "cache")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "erase_config.json").read_text())
    assert record["config"]["concept"] == ["seven", "red"] and [c["name"] for c in record["concepts"]] == ["seven", "red"]
    assert record["concept"]["name"] == "seven+red" and "erased seven + red with esd-x" in proc.stdout
    from safetensors import safe_open

    with safe_open(str(out / "saliency_mask.safetensors"), "pt") as f:  # the mask is the run's, of both concepts
        assert f.metadata()["concept"] == "seven+red"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--concept", "unicorns"], "unknown concept 'unicorns'"),
        (["--concept", "nudity", "--mask-ratio", "0"], "mask ratio must be in (0, 1]"),
        (["--concept", "nudity", "--mask-ratio", "1.5"], "mask ratio must be in (0, 1]"),
        (["--concept", "nudity", "--method", "magic"], "unknown method 'magic'"),
        (["--concept", "nudity", "--model", "CompVis/stable-diffusion-v1-4"], "cannot load model 'CompVis/stable-diffusion-v1-4'"),
        (["--concept", "nudity", "--model", "/does/not/exist"], "model folder not found"),
        (["--concept", "nudity", "--concept", "seven"], "come from different concept files"),
        (["--concept", "seven", "--concept", "seven"], "concept given twice"),
    ],
)
def test_bad_input_one_line_nonzero_no_output(extra: list[str], message: str, tiny_sd_path: Path, tmp_path: Path, capsys) -> None:
    from erase.train import main

    out = tmp_path / "out"
    rc = main(small_run(tiny_sd_path, out, tmp_path / "cache") + extra)  # later flags win
    err = capsys.readouterr().err
    assert rc != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_bad_input_from_the_command_line_prints_exactly_one_line(tiny_sd_path: Path, tmp_path: Path) -> None:
    proc = run_train(["--concept", "unicorns", *small_run(tiny_sd_path, tmp_path / "out", tmp_path / "cache")])
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown concept") and proc.stderr.count("\n") == 1, proc.stderr


def test_existing_output_dir_and_foreign_mask_are_refused(erased_nudity: Path, tiny_sd_path: Path, tmp_path: Path, capsys) -> None:
    from erase.saliency import save_mask
    from erase.train import main

    keep = sorted(p.name for p in erased_nudity.iterdir())
    assert main(["--concept", "nudity", *small_run(tiny_sd_path, erased_nudity, tmp_path / "cache")]) != 0
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in erased_nudity.iterdir()) == keep

    foreign = tmp_path / "foreign.safetensors"
    save_mask({"conv_in.weight": torch.ones(3, 3, dtype=torch.bool)}, foreign)
    out = tmp_path / "out"
    assert main(["--concept", "nudity", "--mask", str(foreign), *small_run(tiny_sd_path, out, tmp_path / "cache")]) != 0
    assert "does not fit this model" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def check_erasure(original: Path, erased: Path) -> None:
    """Masked-out UNet weights, the text encoder and the VAE bit-identical; UNet saved in fp32."""
    from diffusers import UNet2DConditionModel

    before, after = weights(original, "unet"), weights(erased, "unet")
    mask = load_mask(erased / "saliency_mask.safetensors", UNet2DConditionModel.from_pretrained(original / "unet"))
    assert all(after[k].dtype == torch.float32 for k in after), "the UNet's fp32 master weights were not saved"
    for name, m in mask.items():
        assert torch.equal(after[name][~m], before[name][~m]), f"{name}: a masked-out weight moved"
    assert any(not torch.equal(after[k], before[k]) for k in before), "nothing was trained"
    for component in ["vae", "text_encoder"]:
        a, b = weights(original, component), weights(erased, component)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component


def test_bf16_on_the_cpu_keeps_fp32_masters_and_frozen_modules(tiny_sd_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_train(["--concept", "nudity", "--mixed-precision", "bf16", *small_run(tiny_sd_path, out, tmp_path / "cache")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_erasure(tiny_sd_path, out)
    record = json.loads((out / "erase_config.json").read_text())
    assert set(record["seconds"]) == {"data", "mask", "train", "save"}
    assert set(record["peak_memory_gib"]) == {"data", "mask", "train"} and record["device"] == "cpu"
    # the bf16 sets are cached apart from fp32 ones: the key names the precision
    index = json.loads(next((tmp_path / "cache" / "images").glob("*/index.json")).read_text())
    assert index["autocast"] == "bfloat16" and index["dtypes"] == {"unet": "float32", "vae": "bfloat16", "text_encoder": "bfloat16"}


def test_every_other_method_in_bf16_on_the_cpu(tiny_sd_path: Path, tmp_path: Path) -> None:
    """The CPU counterpart of the CUDA mixed-precision test for rl and ESD (its teacher is built in bf16;
    esd-u runs the same code on another subset): fp32 masters saved, frozen modules and weights outside
    the method's subset untouched."""
    for method in ("rl", "esd-x"):
        out = tmp_path / method
        proc = run_train(["--concept", "nudity", "--method", method, "--mixed-precision", "bf16",
                          *small_run(tiny_sd_path, out, tmp_path / "cache")])  # one cache: the sets are made once
        assert proc.returncode == 0, proc.stderr[-3000:]
        check_erasure(tiny_sd_path, out)
        record = json.loads((out / "erase_config.json").read_text())
        assert record["config"]["mixed_precision"] == "bf16" and record["config"]["mask_ratio"] is None


def test_fp16_without_a_gpu_is_one_clear_error(tiny_sd_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_train(["--concept", "nudity", "--mixed-precision", "fp16", *small_run(tiny_sd_path, out, tmp_path / "cache")])
    assert proc.returncode == 2 and proc.stderr.startswith("error: --mixed-precision fp16 needs a GPU"), proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["salun", "rl", "esd-x", "esd-u", "salun --adversarial"])
def test_each_method_on_cuda_in_mixed_precision(method: str, precision: str, tiny_sd_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}
    cmd = [sys.executable, TRAIN, "--concept", "nudity", "--method", *method.split(), "--mixed-precision", precision,
           *small_run(tiny_sd_path, out, tmp_path / "cache")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_erasure(tiny_sd_path, out)
    record = json.loads((out / "erase_config.json").read_text())
    assert record["device"].startswith("cuda") and all(v > 0 for v in record["peak_memory_gib"].values())
