"""`python -m erase.export`: LoRA (diffusers and kohya layouts), single-file and delta exports of an
erased pipeline. Each export is loaded into a fresh ORIGINAL pipeline by a process that never imports
this project, and its images are compared with the erased folder's for the same seeds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from erase.export.__main__ import main

PROMPTS = ["a red handwritten digit seven", "a blue handwritten digit two"]

# Run by a fresh interpreter with diffusers, torch, safetensors and numpy only: for each case, the
# erased folder's images and the images of the original pipeline with each export applied (same
# prompts and seeds); a single file's tensors are also compared one by one with the erased folder's.
CHECK = r"""
import json, sys
import numpy as np, torch
import diffusers
from safetensors.torch import load_file

torch.set_num_threads(1)  # tiny models: one thread is as fast, and much faster on a busy machine

def images(pipe, prompts, **call):
    pipe.set_progress_bar_config(disable=True)
    generator = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=2, generator=generator, output_type="np", **call).images * 255

def apply_delta(pipe, path):  # the README's lines
    delta = load_file(path)
    for key, value in delta.items():
        if key.endswith(".indices"):
            continue
        name = key.removesuffix(".values")
        component, _, tensor_name = name.partition(".")
        state = getattr(pipe, component).state_dict()
        target = state[tensor_name] if tensor_name in state else state[tensor_name.removeprefix("text_model.")]
        with torch.no_grad():
            if key.endswith(".values"):
                target.view(-1)[delta[name + ".indices"].long().to(target.device)] = value.to(target)
            else:
                target.copy_(value)

report = []
for case in json.loads(sys.argv[1]):
    cls = getattr(diffusers, case["pipeline"])
    call = case.get("call", {})  # the pipeline call's own arguments (Flux: the image size)
    erased = cls.from_pretrained(case["erased"])
    want = images(erased, case["prompts"], **call)
    result = {"original": float(np.abs(images(cls.from_pretrained(case["original"]), case["prompts"], **call) - want).max())}
    for kind, path in case["exports"]:
        if kind == "single-file":
            pipe = cls.from_single_file(path, config=case["original"])
            # diffusers 0.42.1 leaves the T5 it builds from an SD3 file in training mode (dropout on)
            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module):
                    module.eval()
            result["tensors_differing"] = [
                f"{c}.{k}" for c in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
                if getattr(erased, c, None) is not None
                for k, v in getattr(erased, c).state_dict().items() if not torch.equal(v, getattr(pipe, c).state_dict()[k])]
        else:
            pipe = cls.from_pretrained(case["original"])
            pipe.load_lora_weights(path) if kind == "lora" else apply_delta(pipe, path)
        result[path] = float(np.abs(images(pipe, case["prompts"], **call) - want).max())
    report.append(result)
assert not any(m == "erase" or m.startswith("erase.") for m in sys.modules), "the check imported this project"
print(json.dumps(report))
"""


def perturb(pipe, seed: int = 0, biases: bool = False, vae: bool = False) -> None:
    """An erasure's footprint without training: the cross-attention keys and values move as UCE moves
    them (whole tensors), every other UNet weight in 30% of its entries as under a SalUn mask, and three
    text-encoder projections (of each encoder); optionally the UNet's biases and norms (no LoRA carries those) or the VAE."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * 0.3 * (p.std() if p.numel() > 1 else 1)
            if p.ndim >= 2 and ("attn2.to_k" in name or "attn2.to_v" in name):
                p += noise
            elif p.ndim >= 2 or biases:
                p += noise * (torch.rand(p.shape, generator=generator) < 0.3)
        for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):  # SDXL: both encoders
            for name, p in encoder.named_parameters() if encoder is not None else []:
                if name.endswith(("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.out_proj.weight", "layers.1.mlp.fc1.weight")):
                    p += torch.randn(p.shape, generator=generator) * 0.1
        if vae:
            pipe.vae.decoder.conv_out.weight.mul_(1.5)


def make_erased(original: Path, folder: Path, **changes) -> Path:
    """A folder as erase/train.py writes it: the perturbed pipeline and an erase_config.json naming `original`."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(original)
    perturb(pipe, **changes)
    pipe.save_pretrained(folder, safe_serialization=True)
    record = {"config": {"pretrained_model_name_or_path": str(original), "method": "salun"}, "concept": {"name": "seven"}}
    (folder / "erase_config.json").write_text(json.dumps(record))
    return folder


def build_tiny_sdxl_two_widths():
    """SDXL in miniature with text encoders of different widths (32 and 48, like ViT-L and bigG), which
    diffusers' single-file loader tells apart by their widths."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from erase.digits import build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=32 + 48,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8, sample_size=32, force_upcast=True,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    tokenizer = build_tokenizer()
    common = dict(intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
                  max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=32, **common)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, hidden_act="gelu", **common)),
        tokenizer=tokenizer, tokenizer_2=build_tokenizer(), unet=unet, force_zeros_for_empty_prompt=True, add_watermarker=False,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
    )


def build_tiny_sd2_openclip():
    """SD 2.x in miniature with an OpenCLIP-style text encoder (gelu), written as cond_stage_model.model.*."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from conftest import build_tiny_sd2_pipeline

    pipe = build_tiny_sd2_pipeline()
    torch.manual_seed(2)
    pipe.register_modules(text_encoder=CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, hidden_act="gelu",
        vocab_size=len(pipe.tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)))
    return pipe


def export(erased: Path, out: Path, *args: str) -> Path:
    assert main([str(erased), *args, "--out", str(out)]) == 0
    return out


def check_in_fresh_process(cases: list[dict]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(cases)], capture_output=True, text=True, cwd="/", check=False,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def erased_sd(tiny_sd_path, tmp_path_factory) -> Path:
    return make_erased(tiny_sd_path, tmp_path_factory.mktemp("export") / "erased")


@pytest.fixture(scope="module")
def sd_exports(erased_sd, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    return {
        "lora": export(erased_sd, out / "lora.safetensors", "--format", "lora", "--rank", "full"),
        "kohya": export(erased_sd, out / "kohya.safetensors", "--format", "lora", "--rank", "full", "--layout", "kohya"),
        "single-file": export(erased_sd, out / "single.safetensors", "--format", "single-file"),
        "delta": export(erased_sd, out / "delta.safetensors", "--format", "delta"),
    }


def test_every_export_reproduces_the_erasure_in_a_process_without_this_project(tiny_sd_path, erased_sd, sd_exports, capsys):
    (result,) = check_in_fresh_process([{"pipeline": "StableDiffusionPipeline", "original": str(tiny_sd_path),
                                         "erased": str(erased_sd), "prompts": PROMPTS,
                                         "exports": [[k if k != "kohya" else "lora", str(p)] for k, p in sd_exports.items()]}])
    print(json.dumps(result))  # the measured pixel differences (0-255), shown with -s
    assert result["original"] > 10  # the erasure changes the images: a no-op export would fail below
    assert result[str(sd_exports["single-file"])] == 0 and result["tensors_differing"] == []
    assert result[str(sd_exports["delta"])] == 0
    assert result[str(sd_exports["lora"])] < 0.05 and result[str(sd_exports["kohya"])] < 0.05  # full rank: float error only


@pytest.mark.slow
def test_sdxl_and_sd2_exports_load_in_a_process_without_this_project(tmp_path):
    """SDXL (sgm layout, OpenCLIP bigG as embedders.1) and SD 2.x (OpenCLIP as cond_stage_model.model)."""
    cases = []
    for name, build, cls in (("sdxl", build_tiny_sdxl_two_widths, "StableDiffusionXLPipeline"),
                             ("sd2", build_tiny_sd2_openclip, "StableDiffusionPipeline")):
        build().save_pretrained(tmp_path / name, safe_serialization=True)
        erased = make_erased(tmp_path / name, tmp_path / f"{name}-erased")
        exports = [["single-file", str(export(erased, tmp_path / f"{name}.safetensors", "--format", "single-file"))],
                   ["lora", str(export(erased, tmp_path / f"{name}-kohya.safetensors", "--format", "lora", "--rank", "full",
                                       "--layout", "kohya"))],
                   ["lora", str(export(erased, tmp_path / f"{name}-lora.safetensors", "--format", "lora", "--rank", "full"))],
                   ["delta", str(export(erased, tmp_path / f"{name}-delta.safetensors", "--format", "delta"))]]
        cases.append({"pipeline": cls, "original": str(tmp_path / name), "erased": str(erased), "prompts": PROMPTS[:1],
                      "exports": exports})
    for case, result in zip(cases, check_in_fresh_process(cases), strict=True):
        print(case["pipeline"], json.dumps(result))
        assert result["original"] > 10 and result["tensors_differing"] == []
        single, kohya, lora, delta = (path for _, path in case["exports"])
        # every tensor is bit-identical; SDXL's text projection still rounds differently (1e-6) at another
        # memory alignment of the same values, as two loads of one file at different offsets would
        assert result[single] < 0.01 and result[delta] == 0
        assert result[kohya] < 0.05 and result[lora] < 0.05
    with safe_open(str(tmp_path / "sdxl.safetensors"), "pt") as f:  # the layout A1111 and ComfyUI detect SDXL by
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in f.keys()
        assert "model.diffusion_model.label_emb.0.0.weight" in f.keys()


def test_sdxl_and_sd2_single_files_name_tensors_as_the_original_checkpoints(tiny_family_paths, tmp_path):
    """The layouts A1111 and ComfyUI detect each family by; every export is also read back through
    diffusers' own converters before it is written (the slow test above loads them as pipelines)."""
    build_tiny_sd2_openclip().save_pretrained(tmp_path / "sd2", safe_serialization=True)
    expected = {
        tiny_family_paths["sdxl"]: ["conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                                    "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
                                    "conditioner.embedders.1.model.text_projection", "model.diffusion_model.label_emb.0.2.weight",
                                    "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight"],
        tmp_path / "sd2": ["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias", "cond_stage_model.model.ln_final.weight",
                           "model.diffusion_model.output_blocks.1.2.conv.weight", "first_stage_model.decoder.mid.attn_1.q.weight"],
    }
    for original, names in expected.items():
        erased = tmp_path / f"{original.name}-erased"
        shutil.copytree(original, erased)
        (erased / "erase_config.json").write_text(json.dumps({"config": {"pretrained_model_name_or_path": str(original)}}))
        with safe_open(str(export(erased, tmp_path / f"{original.name}.safetensors", "--format", "single-file")), "pt") as f:
            keys = set(f.keys())
            assert set(names) <= keys, set(names) - keys
            if "sd2" in original.name:  # LDM's VAE attention projections are 1x1 convs
                assert f.get_slice("first_stage_model.decoder.mid.attn_1.q.weight").get_shape()[2:] == [1, 1]


def test_factorize_is_the_truncated_svd_and_applies_as_a_conv_lora():
    import torch.nn.functional as F

    from erase.export.lora import factorize

    torch.manual_seed(0)
    delta = torch.randn(8, 6, 3, 3)
    spectrum = torch.linalg.svdvals(delta.reshape(8, -1))
    down, up, kept = factorize(delta, 3)
    assert down.shape == (3, 6, 3, 3) and up.shape == (8, 3, 1, 1)
    assert kept == pytest.approx(float(spectrum[:3].square().sum()), rel=1e-5)
    approx = (up.flatten(1) @ down.flatten(1)).reshape(delta.shape)
    assert float((delta - approx).square().sum()) == pytest.approx(float(spectrum[3:].square().sum()), rel=1e-4)  # Eckart-Young
    x = torch.randn(2, 6, 5, 5)  # as peft applies it: a 3x3 conv down to r channels, then a 1x1 conv up
    assert torch.allclose(F.conv2d(F.conv2d(x, down, padding=1), up), F.conv2d(x, approx, padding=1), atol=1e-4)
    down, up, kept = factorize(delta, None)
    assert down.shape[0] == 8 and torch.allclose((up.flatten(1) @ down.flatten(1)).reshape(delta.shape), delta, atol=1e-5)


@pytest.fixture(scope="module")
def erased_with_biases(tiny_sd_path, tmp_path_factory) -> Path:
    return make_erased(tiny_sd_path, tmp_path_factory.mktemp("export") / "erased-biases", biases=True)


def test_lora_reports_rank_size_and_energy_counting_bias_changes_as_not_kept(tiny_sd_path, erased_with_biases, tmp_path, capsys):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    out = export(erased_with_biases, tmp_path / "rank2.safetensors", "--format", "lora", "--rank", "2")
    printed = capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        metadata, ranks = f.metadata(), {f.get_slice(k).get_shape()[0] for k in f.keys() if ".lora_A." in k}
    kept = total = biases = 0.0  # the account, kept independently here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK on small matrices: several threads are slower, and far slower on a busy machine
    for cls, component in ((UNet2DConditionModel, "unet"), (CLIPTextModel, "text_encoder")):
        erased = cls.from_pretrained(erased_with_biases, subfolder=component).state_dict()
        original = cls.from_pretrained(tiny_sd_path, subfolder=component).state_dict()
        for key, value in erased.items():
            change = value - original[key]
            total += float(change.square().sum())
            if change.ndim in (2, 4):
                kept += float(torch.linalg.svdvals(change.flatten(1))[:2].square().sum())
            else:
                biases += float(change.square().sum())
    torch.set_num_threads(threads)
    assert ranks == {2} and metadata["rank"] == "2" and int(metadata["file_bytes"]) == out.stat().st_size
    assert float(metadata["energy_kept"]) == pytest.approx(kept / total, rel=1e-3)
    assert float(metadata["energy_not_representable"]) == pytest.approx(biases / total, rel=1e-3) and biases > 0
    assert "rank 2" in printed and "not kept" in printed and f"{100 * kept / total:.2f}%" in printed


def test_lora_layouts_name_every_layer_as_their_loaders_expect(sd_exports):
    with safe_open(str(sd_exports["kohya"]), "pt") as f:
        kohya = set(f.keys())
    with safe_open(str(sd_exports["lora"]), "pt") as f:
        peft, metadata = set(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    downs = {k.removesuffix(".lora_down.weight") for k in kohya if k.endswith(".lora_down.weight")}
    assert kohya == {f"{n}.{s}" for n in downs for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in downs
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in downs and "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in downs
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight" in peft
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in peft
    assert metadata["unet.lora_alpha"] == metadata["unet.r"] and metadata["unet.alpha_pattern"] == metadata["unet.rank_pattern"]


def test_delta_keeps_each_tensor_whole_or_as_changed_entries_and_applies_exactly(tiny_sd_path, erased_sd, sd_exports):
    from erase.export import apply_delta
    from erase.sd import load_pipeline

    with safe_open(str(sd_exports["delta"]), "pt") as f:
        keys = set(f.keys())
    whole = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"  # every entry moved (as UCE)
    assert whole in keys and f"{whole}.indices" not in keys
    assert {"unet.conv_in.weight.indices", "unet.conv_in.weight.values"} <= keys and "unet.conv_in.weight" not in keys  # 30% moved
    pipe, erased = load_pipeline(str(tiny_sd_path)), load_pipeline(str(erased_sd))
    changed = apply_delta(pipe, sd_exports["delta"])
    assert len(changed) == len({k.removesuffix(".values") for k in keys if not k.endswith(".indices")}) > 80
    for component in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(pipe, component).state_dict(), getattr(erased, component).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), component


def test_a_changed_vae_is_refused_by_lora_and_carried_by_delta(tiny_sd_path, tmp_path, capsys):
    from erase.export import apply_delta
    from erase.sd import load_pipeline

    erased = make_erased(tiny_sd_path, tmp_path / "erased", vae=True)
    assert main([str(erased), "--format", "lora", "--out", str(tmp_path / "lora.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the vae changed" in err and not (tmp_path / "lora.safetensors").exists()
    pipe = load_pipeline(str(tiny_sd_path))
    apply_delta(pipe, export(erased, tmp_path / "delta.safetensors", "--format", "delta"))
    assert torch.equal(pipe.vae.decoder.conv_out.weight, load_pipeline(str(erased)).vae.decoder.conv_out.weight)


def test_an_unchanged_folder_has_nothing_to_export(tiny_sd_path, tmp_path, capsys):
    folder = tmp_path / "same"
    shutil.copytree(tiny_sd_path, folder)
    (folder / "erase_config.json").write_text(json.dumps({"config": {"pretrained_model_name_or_path": str(tiny_sd_path)}}))
    assert main([str(folder), "--format", "delta", "--out", str(tmp_path / "d.safetensors")]) == 2
    assert "nothing changed" in capsys.readouterr().err and not (tmp_path / "d.safetensors").exists()


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_partial_one(erased_sd, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    out = tmp_path / "delta.safetensors"
    out.write_bytes(b"previous")

    def fail_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail_half_way)
    assert main([str(erased_sd), "--format", "delta", "--out", str(out)]) == 1
    assert capsys.readouterr().err == "error: No space left on device\n"
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["delta.safetensors"]


BAD_INPUTS = {
    "no folder": (["{missing}", "--format", "delta"], "erased folder not found"),
    "not an erasure": (["{original}", "--format", "delta"], "is not an erasure"),
    "rank 0": (["{erased}", "--format", "lora", "--rank", "0"], "rank must be an integer >= 1 or 'full'"),
    "rank not a number": (["{erased}", "--format", "lora", "--rank", "eight"], "rank must be"),
    "unknown format": (["{erased}", "--format", "ckpt"], "invalid choice"),
    "unknown layout": (["{erased}", "--format", "lora", "--layout", "a1111"], "invalid choice"),
    "layout without lora": (["{erased}", "--format", "delta", "--layout", "kohya"], "apply to --format lora only"),
    "rank without lora": (["{erased}", "--format", "single-file", "--rank", "4"], "apply to --format lora only"),
    "not safetensors": (["{erased}", "--format", "delta", "--out", "{tmp}/delta.ckpt"], "must name a .safetensors file"),
    "out is a folder": (["{erased}", "--format", "delta", "--out", "{tmp}/folder.safetensors"], "is a folder"),
    "another family": (["{erased}", "--format", "lora", "--original", "{sdxl}"], "was not erased from"),
    "original for single-file": (["{erased}", "--format", "single-file", "--original", "{original}"], "--original applies to"),
    "missing original": (["{erased}", "--format", "delta", "--original", "{missing}"], "original model folder not found"),
    "no LDM layout": (["{odd}", "--format", "single-file"], "cannot write"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_in_one_line_before_any_model_loads(case, erased_sd, tiny_sd_path, tiny_family_paths, tmp_path,
                                                                  monkeypatch, capsys):
    import erase.export.single_file
    import erase.export.weights

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(erase.export.weights, "load_component", no_loading)
    monkeypatch.setattr(erase.export.single_file, "load_component", no_loading)
    (tmp_path / "folder.safetensors").mkdir()
    odd = tmp_path / "odd"  # an erasure whose UNet has a different number of layers per block
    shutil.copytree(erased_sd, odd, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((odd / "unet" / "config.json").read_text())
    (odd / "unet" / "config.json").write_text(json.dumps(config | {"layers_per_block": [1, 2]}))
    names = {"missing": tmp_path / "missing", "original": tiny_sd_path, "erased": erased_sd, "tmp": tmp_path,
             "sdxl": tiny_family_paths["sdxl"], "odd": odd}
    args, message = BAD_INPUTS[case]
    args = [a.format(**names) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "export.safetensors")]
    try:
        status = main(args)
    except SystemExit as usage_error:  # argparse's own (an unknown choice)
        status = usage_error.code
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "export.safetensors").exists()


def test_the_command_refuses_in_one_line_in_a_fresh_process(erased_sd, tiny_family_paths, tmp_path):
    """`python -m erase.export` itself, with an error found after diffusers and transformers are imported:
    their import-time notes must not reach stderr."""
    out = tmp_path / "lora.safetensors"
    proc = subprocess.run([sys.executable, "-m", "erase.export", str(erased_sd), "--format", "lora", "--original",
                           str(tiny_family_paths["sdxl"]), "--out", str(out)], capture_output=True, text=True, check=False,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stdout == "" and not out.exists()
    assert proc.stderr.count("\n") == 1 and "was not erased from" in proc.stderr and "text_encoder_2" in proc.stderr, proc.stderr


def test_a_small_rank_of_a_large_change_takes_the_randomized_svd_and_matches_the_full_one():
    """Rank 8 of a 640 x 2880 change (SD's widths; rank + 8 below a quarter of 640): the randomized SVD's
    factors give the best rank-8 approximation's error and energy, as the full SVD's do."""
    from erase.export.lora import factorize

    g = torch.Generator().manual_seed(0)
    # a change with a decaying spectrum, as an erasure's is (not white noise, whose top values are all alike)
    delta = (torch.randn(640, 40, generator=g) * torch.logspace(0, -2, 40)) @ torch.randn(40, 2880, generator=g)
    spectrum = torch.linalg.svdvals(delta.double())
    down, up, kept = factorize(delta, 8)
    assert down.shape == (8, 2880) and up.shape == (640, 8)
    assert kept == pytest.approx(float(spectrum[:8].square().sum()), rel=1e-5)
    error = float((delta.double() - up.double() @ down.double()).square().sum())  # in float64: the residual is small
    optimum = float(spectrum[8:].square().sum())
    assert optimum <= error <= 1.001 * optimum  # Eckart-Young: no rank-8 matrix does better


def test_sdxl_kohya_loras_name_each_text_encoder_by_its_own_prefix(tmp_path):
    """kohya's SDXL layout: lora_te1_ for the first text encoder (CLIP ViT-L, 32 wide here), lora_te2_ for
    the second (bigG, 48 wide); swapped, a loader applies each encoder's change to the other."""
    build_tiny_sdxl_two_widths().save_pretrained(tmp_path / "sdxl", safe_serialization=True)
    erased = make_erased(tmp_path / "sdxl", tmp_path / "erased")
    path = export(erased, tmp_path / "kohya.safetensors", "--format", "lora", "--rank", "full", "--layout", "kohya")
    with safe_open(str(path), "pt") as f:
        downs = {k.split(".")[0]: f.get_tensor(k).shape for k in f.keys() if k.endswith("lora_down.weight")}
    q = "_text_model_encoder_layers_0_self_attn_q_proj"
    assert downs[f"lora_te1{q}"][1] == 32 and downs[f"lora_te2{q}"][1] == 48, {k: v for k, v in downs.items() if "_te" in k}
    assert not any(k.startswith("lora_te_") for k in downs)


def test_sdxl_kohya_loras_name_layers_as_kohya_does(tiny_family_paths, tmp_path):
    """SDXL's kohya layout names the UNet's layers by the sgm UNet kohya trains on (input_blocks,
    output_blocks, label_emb), not by diffusers' paths: A1111 maps diffusers-named SDXL layers through its
    SD 1.x table and loses up_blocks_0's upsampler; diffusers and ComfyUI read sgm names (the slow test
    above loads such a file with load_lora_weights)."""
    erased = make_erased(tiny_family_paths["sdxl"], tmp_path / "erased")
    path = export(erased, tmp_path / "kohya.safetensors", "--format", "lora", "--layout", "kohya")
    with safe_open(str(path), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys() if k.startswith("lora_unet_")}
    assert modules and not any(m.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for m in modules)
    assert "lora_unet_label_emb_0_0" in modules and "lora_unet_output_blocks_0_0_in_layers_2" in modules
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k" in modules  # one layer per block here
