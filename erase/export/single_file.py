"""The erased pipeline as one checkpoint in the original Stable Diffusion layout (LDM; sgm for SDXL).

The inverse of diffusers' single-file converters (`diffusers.loaders.single_file_utils`:
convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint,
convert_open_clip_checkpoint). Block indices come from each model's config (blocks, layers per
block), so the same code serves the tiny test pipelines, SD 1.x / 2.x and SDXL. Every export is
read back through diffusers' own converters and compared with the erased weights before it is
written.

    model.diffusion_model.*               the UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*                   the VAE (encoder.down / decoder.up / mid.attn_1)
    cond_stage_model.transformer.*        SD 1.x: OpenAI CLIP, in transformers' own names
    cond_stage_model.model.*              SD 2.x: OpenCLIP (resblocks, fused in_proj)
    conditioner.embedders.0.transformer.* SDXL: CLIP ViT-L
    conditioner.embedders.1.model.*       SDXL: OpenCLIP ViT-bigG, text_projection transposed
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from erase.export.weights import TEXT_ENCODERS, load_component, module_components, text_model_key, write_safetensors

UNET_DOWN, UNET_UP = {"DownBlock2D", "CrossAttnDownBlock2D"}, {"UpBlock2D", "CrossAttnUpBlock2D"}
RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
RESNET_VAE = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}
SD = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
      "text_encoder": ("transformers", "CLIPTextModel")}
SDXL = SD | {"text_encoder_2": ("transformers", "CLIPTextModelWithProjection")}


def _config(folder: str, component: str) -> dict:
    return json.loads((Path(folder) / component / "config.json").read_text())


def text_encoder_prefixes(folder: str) -> dict[str, tuple[str, str]]:
    """{component: (checkpoint prefix, "clip" or "openclip")} for a supported pipeline, or a one-line
    error naming what cannot be written; reads configs only."""
    components = module_components(folder)
    if components == SDXL:
        return {"text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
                "text_encoder_2": ("conditioner.embedders.1.model.", "openclip")}
    if components != SD:
        raise ValueError(f"single-file export writes SD 1.x, 2.x and SDXL base pipelines; {folder} holds "
                         f"{', '.join(f'{k}: {v[1]}' for k, v in sorted(components.items()))}")
    # SD 2.x's OpenCLIP ViT-H uses gelu, OpenAI's CLIP ViT-L (SD 1.x) quick_gelu
    if _config(folder, "text_encoder").get("hidden_act") == "gelu":
        return {"text_encoder": ("cond_stage_model.model.", "openclip")}
    return {"text_encoder": ("cond_stage_model.transformer.", "clip")}


def check_single_file(folder: str) -> None:
    """Everything the LDM layout cannot express is refused here, before any model is loaded."""
    text_encoder_prefixes(folder)
    unet, vae = _config(folder, "unet"), _config(folder, "vae")
    problems = []
    if not isinstance(unet.get("layers_per_block"), int):
        problems.append("the UNet's layers_per_block differs per block")
    if not set(unet["down_block_types"]) <= UNET_DOWN or not set(unet["up_block_types"]) <= UNET_UP:
        problems.append(f"UNet blocks {unet['down_block_types']} / {unet['up_block_types']}")
    if unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        problems.append(f"UNet mid block {unet['mid_block_type']}")
    if unet.get("class_embed_type") or unet.get("addition_embed_type") not in (None, "text_time") or unet.get("encoder_hid_dim"):
        problems.append("the UNet's class or added embeddings")
    if set(vae["down_block_types"]) != {"DownEncoderBlock2D"} or set(vae["up_block_types"]) != {"UpDecoderBlock2D"} \
            or not vae.get("mid_block_add_attention", True):
        problems.append("the VAE's blocks")
    if problems:
        raise ValueError(f"single-file export cannot write {folder}: {'; '.join(problems)} have no LDM layout")


def rename_to_checkpoint(key: str, names: dict[str, tuple[str, dict[str, str]]], what: str) -> str:
    """`key` under the longest module prefix of `names` (diffusers prefix -> (LDM prefix, renames of
    the first part of the rest))."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in names:
            new_prefix, renames = names[prefix]
            rest = ".".join(parts[i:])
            for old, new in renames.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return f"{new_prefix}.{rest}"
    raise RuntimeError(f"no checkpoint name for the {what} tensor {key}")


def unet_names(config: dict, keys) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers UNet module prefixes -> LDM ones (convert_ldm_unet_checkpoint, inverted): input block
    1 + b * (L + 1) + l holds down block b's layer l (L = layers per block, the last slot its
    downsampler); output block b * (L + 1) + l up block b's layer l (up blocks have L + 1 layers)."""
    per = config["layers_per_block"] + 1
    names = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.attentions.0": "middle_block.1"}
    names = {k: (v, {}) for k, v in names.items()}
    names |= {"mid_block.resnets.0": ("middle_block.0", RESNET_UNET), "mid_block.resnets.1": ("middle_block.2", RESNET_UNET)}
    for b in range(len(config["down_block_types"])):
        for layer in range(per - 1):
            names[f"down_blocks.{b}.resnets.{layer}"] = (f"input_blocks.{1 + b * per + layer}.0", RESNET_UNET)
            names[f"down_blocks.{b}.attentions.{layer}"] = (f"input_blocks.{1 + b * per + layer}.1", {})
        names[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{1 + b * per + per - 1}.0.op", {})
    for b in range(len(config["up_block_types"])):
        for layer in range(per):
            names[f"up_blocks.{b}.resnets.{layer}"] = (f"output_blocks.{b * per + layer}.0", RESNET_UNET)
            names[f"up_blocks.{b}.attentions.{layer}"] = (f"output_blocks.{b * per + layer}.1", {})
        attention = any(k.startswith(f"up_blocks.{b}.attentions.") for k in keys)
        names[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{b * per + per - 1}.{2 if attention else 1}.conv", {})
    return names


def vae_names(config: dict) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers VAE module prefixes -> LDM ones (convert_ldm_vae_checkpoint, inverted): the decoder's
    up blocks are numbered from the bottom in LDM."""
    n = len(config["up_block_types"])
    names = {f"{part}.{k}": (f"{part}.{v}", {}) for part in ("encoder", "decoder")
             for k, v in {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}.items()}
    names |= {"quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})}
    for part in ("encoder", "decoder"):
        names[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTENTION)
        for k in range(2):
            names[f"{part}.mid_block.resnets.{k}"] = (f"{part}.mid.block_{k + 1}", RESNET_VAE)
    for i in range(len(config["down_block_types"])):
        names[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
        for j in range(config["layers_per_block"]):
            names[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", RESNET_VAE)
    for i in range(n):
        names[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{n - 1 - i}.upsample.conv", {})
        for j in range(config["layers_per_block"] + 1):
            names[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", RESNET_VAE)
    return names


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    names, out = vae_names(config), {}
    for key, value in state.items():
        new = rename_to_checkpoint(key, names, "VAE")
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", new) and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out[new] = value
    return out


def openclip_to_ldm(state: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """transformers' CLIP text model -> OpenCLIP's names (convert_open_clip_checkpoint, inverted):
    q, k and v fused into in_proj, the text projection transposed."""
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    out, qkv = {}, {}
    for key, value in state.items():
        key = text_model_key(component, key)
        layer = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if key in fixed:
            out[fixed[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif layer and (m := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", layer[2])):
            qkv.setdefault(f"transformer.resblocks.{layer[1]}.attn.in_proj_{m[2]}", {})[m[1]] = value
        elif layer:
            rest = layer[2]
            old = next((o for o in OPENCLIP_LAYER if rest.startswith(o + ".")), None)
            if old is None:
                raise RuntimeError(f"no OpenCLIP name for the {component} tensor {key}")
            out[f"transformer.resblocks.{layer[1]}.{OPENCLIP_LAYER[old]}{rest[len(old):]}"] = value
        elif not key.endswith("position_ids"):
            raise RuntimeError(f"no OpenCLIP name for the {component} tensor {key}")
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def ldm_checkpoint(states: dict[str, dict[str, torch.Tensor]], folder: str) -> dict[str, torch.Tensor]:
    """The whole pipeline's tensors (`states`: component -> state dict) under their checkpoint names."""
    unet_config, vae_config = _config(folder, "unet"), _config(folder, "vae")
    checkpoint = {f"model.diffusion_model.{rename_to_checkpoint(k, unet_names(unet_config, states['unet']), 'UNet')}": v
                  for k, v in states["unet"].items()}
    checkpoint |= {f"first_stage_model.{k}": v for k, v in vae_to_ldm(states["vae"], vae_config).items()}
    for component, (prefix, kind) in text_encoder_prefixes(folder).items():
        state = states[component]
        converted = openclip_to_ldm(state, component) if kind == "openclip" else {text_model_key(component, k): v for k, v in state.items()}
        checkpoint |= {prefix + k: v for k, v in converted.items()}
    return checkpoint


def check_round_trip(checkpoint: dict[str, torch.Tensor], states: dict[str, dict[str, torch.Tensor]], folder: str,
                     text_encoders: dict[str, torch.nn.Module]) -> None:
    """diffusers' own converters must give back every erased tensor, bit for bit."""
    from diffusers.loaders import single_file_utils as sfu

    back = {"unet": sfu.convert_ldm_unet_checkpoint(checkpoint, _config(folder, "unet")),
            "vae": sfu.convert_ldm_vae_checkpoint(checkpoint, _config(folder, "vae"))}
    for component, (prefix, kind) in text_encoder_prefixes(folder).items():
        if kind == "openclip":
            back[component] = sfu.convert_open_clip_checkpoint(text_encoders[component], checkpoint, prefix=prefix)
        else:
            back[component] = sfu.convert_ldm_clip_checkpoint(checkpoint)
    for component, state in states.items():
        got = back[component]
        for key, value in state.items():
            mine = got.get(text_model_key(component, key), got.get(key))
            if mine is None or mine.shape != value.shape or not torch.equal(mine, value):
                raise RuntimeError(f"the checkpoint does not give back the {component} tensor {key} through diffusers' "
                                   "converters")


def export_single_file(erased: str, out: str, metadata: dict[str, str] | None = None) -> dict:
    """Write the erased pipeline as one checkpoint, checked through diffusers' converters first."""
    states, text_encoders = {}, {}
    for name, library_class in module_components(erased).items():
        module = load_component(erased, name, library_class)
        states[name] = module.state_dict()
        if name in TEXT_ENCODERS:
            text_encoders[name] = module
    checkpoint = ldm_checkpoint(states, erased)
    check_round_trip(checkpoint, states, erased, text_encoders)
    layout = "sgm (SDXL)" if "text_encoder_2" in states else "ldm (SD 1.x / 2.x)"
    info = {"export": "single-file", "layout": layout, "tensors": str(len(checkpoint))}
    size = write_safetensors(out, {k: v.contiguous() for k, v in checkpoint.items()}, (metadata or {}) | info)
    return {"format": "single-file", "layout": layout, "tensors": len(checkpoint), "file_bytes": size,
            "text_encoders": {k: v[1] for k, v in text_encoder_prefixes(erased).items()}}
