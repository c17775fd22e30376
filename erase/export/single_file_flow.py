"""SD3 / SD3.5 and FLUX.1 as one checkpoint in their original layouts: the inverse of diffusers'
`convert_sd3_transformer_checkpoint_to_diffusers` and `convert_flux_transformer_checkpoint_to_diffusers`.

    SD3 (the whole pipeline, as Stability's sd3.5 files):
        model.diffusion_model.*              the MMDiT (joint_blocks.N.x_block / context_block, q/k/v fused)
        first_stage_model.*                  the VAE (LDM names)
        text_encoders.clip_l.transformer.*   CLIP-L, text_encoders.clip_g.transformer.* CLIP-G,
        text_encoders.t5xxl.transformer.*    T5 (where the pipeline has one), in transformers' names
    FLUX.1 (the transformer alone, as Black Forest Labs' flux1-dev.safetensors; VAE and encoders stay
    the original's): double_blocks.N.img_attn.qkv, single_blocks.N.linear1 (q, k, v and the MLP input
    fused), txt_in, vector_in, final_layer ...

Both AdaLayerNormContinuous projections keep (shift, scale) in the original layout and (scale, shift)
in diffusers'. Every export is read back through diffusers' own converter before it is written.
diffusers reads Flux files of FLUX.1's width only (its converter fixes 3072 and an MLP ratio of 4).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers.loaders import single_file_utils as sfu

from erase.export.single_file import vae_to_ldm
from erase.export.weights import load_component, module_components, text_model_key, write_safetensors

__all__ = ["FLUX_WIDTH", "export_single_file_flow", "check_flux_width", "flux_to_bfl", "sd3_checkpoint", "sd3_to_mmdit"]

FLUX_WIDTH = 3072  # what diffusers' Flux converter assumes (inner_dim)


def _swap(t: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale) along the rows."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def _original_names(state: dict[str, torch.Tensor], table: list[tuple[str, str]], fused: list[tuple[str, list[str]]],
            swapped: set[str], what: str) -> dict[str, torch.Tensor]:
    """Every tensor of `state` under its original name: `table` maps module patterns (regex, with groups)
    one to one, `fused` concatenates several modules' weights and biases into one (in order)."""
    out, done = {}, set()
    for new, parts in fused:
        for leaf in ("weight", "bias"):
            keys = [f"{p}.{leaf}" for p in parts]
            if all(k in state for k in keys):
                out[f"{new}.{leaf}"] = torch.cat([state[k] for k in keys])
                done.update(keys)
    for key, value in state.items():
        if key in done:
            continue
        module, _, leaf = key.rpartition(".")
        for pattern, replacement in table:
            if (m := re.fullmatch(pattern, module)) is not None:
                new = m.expand(replacement)
                out[f"{new}.{leaf}" if leaf else new] = _swap(value) if module in swapped else value
                break
        else:
            raise RuntimeError(f"no original name for the {what} tensor {key}")
    return out


def flux_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel's state dict under Black Forest Labs' names."""
    doubles = sorted({int(m[1]) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    singles = sorted({int(m[1]) for k in state if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))})
    fused = []
    for i in doubles:
        b = f"transformer_blocks.{i}.attn"
        fused += [(f"double_blocks.{i}.img_attn.qkv", [f"{b}.to_q", f"{b}.to_k", f"{b}.to_v"]),
                  (f"double_blocks.{i}.txt_attn.qkv", [f"{b}.add_q_proj", f"{b}.add_k_proj", f"{b}.add_v_proj"])]
    for i in singles:
        b = f"single_transformer_blocks.{i}"
        fused.append((f"single_blocks.{i}.linear1", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"]))
    d, s = r"transformer_blocks\.(\d+)\.", r"single_transformer_blocks\.(\d+)\."
    table = [
        (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer"),
        (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer"),
        (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer"),
        (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer"),
        (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer"),
        (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer"),
        (r"context_embedder", "txt_in"), (r"x_embedder", "img_in"), (r"proj_out", "final_layer.linear"),
        (r"norm_out\.linear", "final_layer.adaLN_modulation.1"),
        (d + r"norm1\.linear", r"double_blocks.\1.img_mod.lin"), (d + r"norm1_context\.linear", r"double_blocks.\1.txt_mod.lin"),
        (d + r"attn\.norm_q", r"double_blocks.\1.img_attn.norm.query_norm"),
        (d + r"attn\.norm_k", r"double_blocks.\1.img_attn.norm.key_norm"),
        (d + r"attn\.norm_added_q", r"double_blocks.\1.txt_attn.norm.query_norm"),
        (d + r"attn\.norm_added_k", r"double_blocks.\1.txt_attn.norm.key_norm"),
        (d + r"ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.0"), (d + r"ff\.net\.2", r"double_blocks.\1.img_mlp.2"),
        (d + r"ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.0"), (d + r"ff_context\.net\.2", r"double_blocks.\1.txt_mlp.2"),
        (d + r"attn\.to_out\.0", r"double_blocks.\1.img_attn.proj"), (d + r"attn\.to_add_out", r"double_blocks.\1.txt_attn.proj"),
        (s + r"norm\.linear", r"single_blocks.\1.modulation.lin"), (s + r"proj_out", r"single_blocks.\1.linear2"),
        (s + r"attn\.norm_q", r"single_blocks.\1.norm.query_norm"), (s + r"attn\.norm_k", r"single_blocks.\1.norm.key_norm"),
    ]
    out = _original_names(state, table, fused, {"norm_out.linear"}, "Flux transformer")
    # RMS norms hold `scale` in BFL's names, `weight` in diffusers'
    return {re.sub(r"_norm\.weight$", "_norm.scale", k): v for k, v in out.items()}


def sd3_to_mmdit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel's state dict under the original MMDiT names."""
    blocks = sorted({int(m[1]) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    last = blocks[-1]
    fused = []
    for i in blocks:
        b, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        fused += [(f"{o}.x_block.attn.qkv", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"]),
                  (f"{o}.context_block.attn.qkv", [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"]),
                  (f"{o}.x_block.attn2.qkv", [f"{b}.attn2.to_q", f"{b}.attn2.to_k", f"{b}.attn2.to_v"])]
    d = r"transformer_blocks\.(\d+)\."
    table = [
        (r"pos_embed\.proj", "x_embedder.proj"),
        (r"time_text_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0"),
        (r"time_text_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2"),
        (r"time_text_embed\.text_embedder\.linear_1", "y_embedder.mlp.0"),
        (r"time_text_embed\.text_embedder\.linear_2", "y_embedder.mlp.2"),
        (r"context_embedder", "context_embedder"), (r"proj_out", "final_layer.linear"),
        (r"norm_out\.linear", "final_layer.adaLN_modulation.1"),
        (d + r"attn\.norm_q", r"joint_blocks.\1.x_block.attn.ln_q"), (d + r"attn\.norm_k", r"joint_blocks.\1.x_block.attn.ln_k"),
        (d + r"attn\.norm_added_q", r"joint_blocks.\1.context_block.attn.ln_q"),
        (d + r"attn\.norm_added_k", r"joint_blocks.\1.context_block.attn.ln_k"),
        (d + r"attn2\.norm_q", r"joint_blocks.\1.x_block.attn2.ln_q"), (d + r"attn2\.norm_k", r"joint_blocks.\1.x_block.attn2.ln_k"),
        (d + r"attn\.to_out\.0", r"joint_blocks.\1.x_block.attn.proj"), (d + r"attn2\.to_out\.0", r"joint_blocks.\1.x_block.attn2.proj"),
        (d + r"attn\.to_add_out", r"joint_blocks.\1.context_block.attn.proj"),
        (d + r"norm1\.linear", r"joint_blocks.\1.x_block.adaLN_modulation.1"),
        (d + r"norm1_context\.linear", r"joint_blocks.\1.context_block.adaLN_modulation.1"),
        (d + r"ff\.net\.0\.proj", r"joint_blocks.\1.x_block.mlp.fc1"), (d + r"ff\.net\.2", r"joint_blocks.\1.x_block.mlp.fc2"),
        (d + r"ff_context\.net\.0\.proj", r"joint_blocks.\1.context_block.mlp.fc1"),
        (d + r"ff_context\.net\.2", r"joint_blocks.\1.context_block.mlp.fc2"),
    ]
    # the last block's context side is pre-only: its AdaLayerNormContinuous is stored (shift, scale)
    swapped = {"norm_out.linear", f"transformer_blocks.{last}.norm1_context.linear"}
    state = dict(state)
    positions = state.pop("pos_embed.pos_embed")  # a buffer of the patch embedding, top level in MMDiT
    return {"pos_embed": positions} | _original_names(state, table, fused, swapped, "SD3 transformer")


SD3_TEXT_PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
                     "text_encoder_3": "text_encoders.t5xxl.transformer."}


def sd3_checkpoint(states: dict[str, dict[str, torch.Tensor]], vae_config: dict) -> dict[str, torch.Tensor]:
    """The whole SD3 pipeline's tensors (`states`: component -> state dict) under the original names."""
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in sd3_to_mmdit(states["transformer"]).items()}

    checkpoint |= {f"first_stage_model.{k}": v for k, v in vae_to_ldm(states["vae"], vae_config).items()}
    for component, prefix in SD3_TEXT_PREFIXES.items():
        if component in states:
            # T5 ties its encoder's token embedding to `shared`; diffusers' loader fills each name from the
            # file without tying, so both are written (a copy: safetensors stores no shared memory)
            checkpoint |= {prefix + text_model_key(component, k): v.clone() if k == "encoder.embed_tokens.weight" else v
                           for k, v in states[component].items()}
    return checkpoint


def _check_same(back: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str) -> None:
    for key, value in state.items():
        mine = back.get(key)
        if mine is None or mine.shape != value.shape or not torch.equal(mine, value):
            raise RuntimeError(f"the checkpoint does not give back the {what} tensor {key} through diffusers' converter")


def check_flux_width(folder: str) -> None:
    """A Flux folder whose transformer diffusers can read back from a single file (from its config alone)."""
    config = json.loads((Path(folder) / "transformer" / "config.json").read_text())
    if (width := config["num_attention_heads"] * config["attention_head_dim"]) != FLUX_WIDTH:
        raise ValueError(f"diffusers reads Flux single files of FLUX.1's width ({FLUX_WIDTH}) only; this transformer is "
                         f"{width} wide: export --format lora or delta")


def export_single_file_flow(erased: str, out: str, flux: bool, metadata: dict[str, str] | None = None) -> dict:
    """Write an SD3 pipeline (or a Flux transformer) as one original-layout checkpoint, checked through
    diffusers' own converters first."""
    components = module_components(erased)
    if flux:
        state = load_component(erased, "transformer", components["transformer"]).state_dict()
        checkpoint = flux_to_bfl(state)
        _check_same(sfu.convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint)), state, "transformer")
        layout = "bfl (the FLUX.1 transformer; VAE and text encoders stay the original's)"
    else:
        states = {name: load_component(erased, name, cls).state_dict() for name, cls in components.items()}
        vae_config = json.loads((Path(erased) / "vae" / "config.json").read_text())
        checkpoint = sd3_checkpoint(states, vae_config)
        inner = {k.removeprefix("model.diffusion_model."): v for k, v in checkpoint.items() if k.startswith("model.diffusion_model.")}
        _check_same(sfu.convert_sd3_transformer_checkpoint_to_diffusers(inner), states["transformer"], "transformer")
        _check_same(sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config), states["vae"], "VAE")
        layout = "sd3 (MMDiT, VAE, CLIP-L, CLIP-G" + (", T5)" if "text_encoder_3" in states else ")")
    info = {"export": "single-file", "layout": layout, "tensors": str(len(checkpoint))}
    size = write_safetensors(out, {k: v.contiguous() for k, v in checkpoint.items()}, (metadata or {}) | info)
    return {"format": "single-file", "layout": layout, "tensors": len(checkpoint), "file_bytes": size}
