"""SD 2.x (v-prediction) and SDXL (two text encoders, added conditioning) through the same
commands as SD 1.x, on tiny pipelines built from configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erase.saliency import load_mask

from test_train import ENV, TRAIN, assert_loads_without_the_project, run_train, weights

FORGET, ANCHOR = "a photo of a nude person", "a photo of a person wearing clothes"


def erase(model: Path, out: Path, method: str, *extra: str) -> subprocess.CompletedProcess:
    return run_train(["--model", str(model), "--concept", "nudity", "--method", method, "--num-images", "4",
                      "--generation-steps", "2", "--train-batch-size", "2", "--saliency-batch-size", "2",
                      "--max-train-steps", "6", "--learning-rate", "1e-4", "--output-dir", str(out),
                      "--cache-dir", str(out.parent / "cache"), *extra])


@torch.no_grad()
def forget_distance(original: Path, unet_folder: Path, method: str) -> float:
    """The method's forget loss for the UNet in `unet_folder` on fixed noisy latents and timesteps:
    its prediction for the forget prompt against its own prediction under the anchor (SalUn,
    RL), or against ESD's negatively guided target from the original model."""
    from diffusers import UNet2DConditionModel

    from erase.conditioning import unet_kwargs
    from erase.objectives import anchor_target, esd_target
    from erase.sd import encode_prompts, load_pipeline

    pipe = load_pipeline(str(original))
    cond, anchor, uncond = (encode_prompts(pipe, [p] * 4) for p in (FORGET, ANCHOR, ""))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([100, 300, 500, 800])
    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    if method.startswith("esd"):
        target = esd_target(pipe.unet, x, t, cond, uncond)
    else:
        target = anchor_target(unet, x, t, anchor)
    return float((unet(x, t, **unet_kwargs(cond)).sample - target).pow(2).mean())


def check_output(original: Path, erased: Path, frozen: list[str], method: str) -> None:
    """Frozen components bit-identical, masked-out UNet weights too, and the forget prompt's
    prediction moved towards the method's target (its forget loss fell). (That the forget prompt's output changes more
    than other prompts' cannot be seen on these random models: their UNets barely use the text,
    and every prompt's prediction moved alike, 0.268 vs 0.269 on the SD 2.x one.)"""
    for component in frozen:
        a, b = weights(original, component), weights(erased, component)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component
    before, after = weights(original, "unet"), weights(erased, "unet")
    mask = load_mask(erased / "saliency_mask.safetensors")
    for name, m in mask.items():
        assert torch.equal(after[name][~m], before[name][~m]), f"{name}: a masked-out weight moved"
    # measured at these settings: 0.55-0.95 of the loss before for SDXL, 0.12-0.86 for SD 2.x
    assert forget_distance(original, erased / "unet", method) < 0.97 * forget_distance(original, original / "unet", method)


SDXL_FROZEN = ["vae", "text_encoder", "text_encoder_2"]
LOADS_AS = {"sdxl": ("StableDiffusionXLPipeline", "epsilon"), "sd2": ("StableDiffusionPipeline", "v_prediction")}
CASES = [(family, method) for family in ("sdxl", "sd2") for method in ("salun", "uce", "rl", "esd-x", "esd-u")]  # every one fast


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_adversarial_erasure_runs_on_each_family(family: str, tiny_family_paths, tmp_path: Path) -> None:
    """The inner attack's placeholder words live in every text encoder (both of SDXL's); the
    published pipeline knows none of them."""
    from diffusers import DiffusionPipeline

    original, out = tiny_family_paths[family], tmp_path / "out"
    proc = erase(original, out, "salun", "--beta", "0", "--adversarial", "--adversarial-every", "3", "--adversarial-steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_output(original, out, SDXL_FROZEN if family == "sdxl" else ["vae", "text_encoder"], "salun")
    record = json.loads((out / "erase_config.json").read_text())
    assert record["adversarial"]["settings"]["vectors"] == 4 and record["final_losses"]["attack_loss"] > 0
    pipe, before = DiffusionPipeline.from_pretrained(out), DiffusionPipeline.from_pretrained(original)
    assert len(pipe.tokenizer) == len(before.tokenizer)
    if family == "sdxl":
        assert len(pipe.tokenizer_2) == len(before.tokenizer_2)


@pytest.mark.parametrize("family, method", CASES)
def test_each_method_erases_each_family(family: str, method: str, tiny_family_paths, tmp_path: Path) -> None:
    original, out = tiny_family_paths[family], tmp_path / "out"
    # beta 0: on a random model the retain term's ordinary denoising loss (~1) would swamp the
    # forget loss (~1e-4) and say nothing about the remapping; ESD has no retain term
    proc = erase(original, out, method, "--beta", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_output(original, out, SDXL_FROZEN if family == "sdxl" else ["vae", "text_encoder"], method)
    assert json.loads((out / "erase_config.json").read_text())["config"]["method"] == method
    if method == "salun":  # the output loads with plain diffusers, as its own family's pipeline
        cls, prediction = LOADS_AS[family]
        assert_loads_without_the_project(out, "DiffusionPipeline", f"assert type(pipe).__name__ == {cls!r}\n"
                                         f"assert pipe.scheduler.config.prediction_type == {prediction!r}\n")


def test_sdxl_conditioning_carries_pooled_embeddings_and_time_ids(tiny_family_paths) -> None:
    from erase.sd import encode_prompts, load_pipeline

    pipe = load_pipeline(str(tiny_family_paths["sdxl"]))
    cond = encode_prompts(pipe, [FORGET, ""], resolution=32)
    assert cond.hidden_states.shape == (2, 77, 64) and cond.text_embeds.shape == (2, 32)
    assert cond.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    # the pipeline guides against zeros for the empty prompt (force_zeros_for_empty_prompt): so does the erasure
    assert not cond.hidden_states[1].any() and not cond.text_embeds[1].any() and cond.hidden_states[0].any()


def test_other_pipeline_kinds_are_refused_in_one_line(tiny_sd_path: Path, tmp_path: Path, capsys) -> None:
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_sd_path, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps(index | {"_class_name": "KandinskyPipeline"}))
    from erase.train import main

    rc = main(["--model", str(other), "--concept", "nudity", "--output-dir", str(tmp_path / "out"),
               "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "is a KandinskyPipeline; supported: StableDiffusionPipeline" in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_compare_and_app_handler(family: str, tiny_family_paths, tmp_path: Path) -> None:
    """`python -m eval compare` and the app's generate handler on an erased model of each family."""
    original, out = tiny_family_paths[family], tmp_path / "out"
    assert erase(original, out, "salun", "--max-train-steps", "1").returncode == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{FORGET}\n{ANCHOR}\n")
    proc = subprocess.run([sys.executable, "-m", "eval", "compare", str(original), str(out), "--prompts",
                           str(prompts), "--metrics", "nudity", "--images-per-prompt", "1", "--steps", "2",
                           "--out", str(tmp_path / "report")], env=ENV, capture_output=True, text=True, timeout=300,
                          cwd=Path(TRAIN).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["erased"]["nudity"]["num_images"] == 2

    import app

    demo = app.build_app(str(original), str(out), labeller=None, steps=2, guidance=5.0)
    handler = next(fn.fn for fn in demo.fns.values() if fn.name == "run")
    original, erased, caption = handler(FORGET, 0, 2, 5.0, 2, False)
    assert len(original) == 2 and len(erased) == 2 and "seeds 0-1" in caption


def check_worst_case_prompt_search(model: Path, method: str, tmp_path: Path) -> None:
    """The worst-case prompt search picks 2 of 4 candidate pairs in 2 outer steps on `model`."""
    from erase.worst_case import WorstCaseConfig, run

    candidates = tmp_path / "candidates.json"
    candidates.write_text(json.dumps([[FORGET, ANCHOR], ["a red car", "a blue car"], ["a dog", "a cat"], ["a tree", "a house"]]))
    cfg = WorstCaseConfig(target="prompt", model=str(model), prompts=str(candidates), size="2",
                          method=method, outer_steps=2, inner_steps=2, images_per_prompt=1, generation_steps=2,
                          cache_dir=str(tmp_path / "cache"))
    report = run(cfg, show_progress=False)
    assert len(report["prompts"]) == 2 and len(report["history"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["salun", "esd-x"])
def test_worst_case_prompt_search_on_sdxl(method: str, tiny_family_paths, tmp_path: Path) -> None:
    check_worst_case_prompt_search(tiny_family_paths["sdxl"], method, tmp_path)


def test_sdxl_fp16_generation_decodes_in_the_vaes_fp32(tiny_family_paths) -> None:
    """The image sets are generated under fp16 autocast beside an fp32 SDXL VAE (force_upcast): the decode
    must stay fp32, or SDXL's VAE overflows (autocast hides the fp32 weights from the pipeline's upcast)."""
    from erase.sd import generate, load_pipeline

    pipe = load_pipeline(str(tiny_family_paths["sdxl"]))
    dtypes = []
    handle = pipe.vae.decoder.conv_out.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    unet_dtypes = []
    pipe.unet.conv_out.register_forward_hook(lambda m, a, out: unet_dtypes.append(out.dtype))
    images = generate(pipe, ["a red handwritten digit seven"], [0], 2, 5.0, autocast_dtype=torch.float16)
    handle.remove()
    assert dtypes == [torch.float32] and set(unet_dtypes) == {torch.float16} and len(images) == 1
    assert type(pipe.vae).decode is pipe.vae.decode.__func__  # the VAE's own method again
