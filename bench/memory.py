"""Per-process memory of a SalUn erasure on SD 1.x, SDXL, SD 3.5 Medium and Large and FLUX.1-dev,
computed from their configs on the meta device (nothing is allocated or downloaded): what fits on a
24 GB card and on an 80 GB one.

For 1, 2, 4 and 8 processes (FSDP2, erase/sharding.py), dense and masked-state Adam
(`--optimizer-state`), three kinds of master weights, with and without gradient checkpointing:
- weights, gradients and Adam's moments: their bytes over the processes (FSDP shards all three);
  masked state keeps the moments of the mask's entries only plus the mask's bits; the dense path
  holds the mask's bits for MaskedUpdate;
- masters: `fp32` (weights, gradients and moments in fp32), `bf16` (all three in bf16: a computed
  row only) and `masked` (`--master-weights masked`: the weights stay bf16 and frozen, the gradients
  are bf16 and dense, and only the mask's entries keep an fp32 master copy and Adam's two fp32
  moments, 12 bytes each: 12 x ratio x P bytes, plus the mask's P / 8 bytes); masked masters go with
  masked state;
- buffers (SD 3.5's positional table): not sharded, in the masters' dtype (bf16 for masked masters);
- autocast copy: with fp32 masters on one process, autocast's bf16 copy of the weights (2 bytes per
  parameter, cached through the forward and saved for the backward); sharded, FSDP gathers units in
  bf16 instead, and bf16 or masked masters need no copy;
- gathered units: FSDP holds the largest unit of erase.sharding.shard_units unsharded, plus the
  next one prefetched and the unit's unsharded gradients in its backward (three times the largest
  unit, in bf16 where the masters are; none on one process); a transformer's unit is one block;
- activations: the tensors one image's forward saves for its backward, counted with
  `saved_tensors_hooks` on the meta device under bf16 autocast, with attention saving what a
  flash / memory-efficient kernel saves (q, k, v, output, log-sum-exp) and not the score matrix.
  torch.autocast leaves meta tensors alone, so its casts are made here (CUDA's policy for the ops
  these models run: matmuls and convolutions in bf16; norms, softmax and exp / pow / rsqrt in
  fp32; the rest in their inputs' widest type); the bf16 copies of the weights it
  makes are not activations and are left out. Gradient checkpointing (diffusers: each resnet and
  transformer layer of a UNet, each block of a transformer) keeps each unit's input (a joint block's
  image and text streams) and recomputes one unit at a time. A SalUn step takes a forget and a
  retain image per `--train-batch-size`, so a step holds 2 x batch x that.
  Resolutions: SD 1.x 512 px; SDXL, SD 3.5 and Flux 1024 px (latent 128 x 128). SD 3.5 attends to
  77 CLIP + 256 T5 tokens (333) beside 4096 image tokens; Flux to 512 T5 tokens beside 4096 packed
  image tokens.
The frozen text encoder(s) and VAE (bf16) are on the GPU while the image sets are generated and
encoded, then leave it (erase/families.py's release_frozen): shown apart, not in the total.
Not counted: the CUDA context and the allocator's fragmentation (a few hundred MB to a GB or two),
the cached latents.
Measured peaks (`torch.cuda.max_memory_allocated` of the training phase) come from bench/sd_gpu.py
runs where a GPU is lent (`--measured`, as bench/gpu_check.sh passes them): SD 1.x on one process,
fp32 masters and dense Adam, with the run's own batch and checkpointing. Other rows, and every row
without such a run, say "not measured".

    python bench/memory.py --out bench/results/memory.json
    python bench/memory.py --batch 8 --measured OUT/sd_gpu_bf16.json OUT/sd_gpu_bf16_checkpointing.json --out OUT/memory.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from erase.families import latent_image_ids, pack_latents
from erase.sd import SD_V1_UNET_CONFIG
from erase.sharding import shard_units

from common import machine, save_results  # bench/common.py (the scripts run from bench/)

GIB = 2**30
FITS = {"24 GB": 24e9 / GIB, "80 GB": 80e9 / GIB}  # 22.35 and 74.51 GiB
PROCESSES = (1, 2, 4, 8)
# (masters, Adam state), from the most precise to the leanest
MODES = (("fp32", "dense"), ("fp32", "masked"), ("bf16", "dense"), ("bf16", "masked"), ("masked", "masked"))

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: 2.57B weights
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# The flow transformers' configs: the hub's transformer/config.json of each repository (not reachable from here: the values
# as several public copies of those files give them, all agreeing); the counts are what the meta-device build gives.
# stabilityai/stable-diffusion-3.5-medium transformer/config.json (SD3Transformer2DModel, MMDiT-X): 2.24B trainable weights
# and a 226M-entry positional table (a buffer: 384 x 384 x 1536), 2.47B in the file.
SD35_MEDIUM_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# stabilityai/stable-diffusion-3.5-large transformer/config.json (no dual attention layers): 8.06B trainable weights and a
# 90M-entry positional table (192 x 192 x 2432), 8.15B in the file
SD35_LARGE_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
    dual_attention_layers=(), qk_norm="rms_norm",
)
# black-forest-labs/FLUX.1-dev transformer/config.json (FluxTransformer2DModel; out_channels None: in_channels): 11.90B weights
FLUX_DEV_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# text_encoder (CLIP ViT-L/14) and text_encoder_2 (OpenCLIP bigG) of SDXL and SD 3.5, text_encoder of Flux
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408,
              max_position_embeddings=77, projection_dim=768)
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, vocab_size=49408,
                     max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
# text_encoder_3/config.json of SD 3.5 and text_encoder_2/config.json of Flux (T5 v1.1 XXL's encoder, gated GELU): 4.76B weights
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128, feed_forward_proj="gated-gelu",
              is_encoder_decoder=False, tie_word_embeddings=False)
# the VAEs (vae/config.json): SD 1.x / SDXL with 4 latent channels; SD 3.5 / Flux with 16 and no quant convs
VAE_4 = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
VAE_16 = dict(VAE_4, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)


@dataclass
class Model:
    name: str
    family: str  # "unet", "sd3" or "flux": which class is built and how it is called
    config: dict
    resolution: int
    encoders: tuple[tuple[type, type, dict], ...]  # the frozen text encoders: (class, config class, config)
    vae: dict
    text_dims: tuple[int, ...] = ()  # a UNet's: the hidden states it attends to (concatenated for SDXL)
    text_tokens: int = 77


CLIP_L_ENCODER = (CLIPTextModel, CLIPTextConfig, CLIP_L)
MODELS = {
    "sd1": Model("SD 1.x (CompVis/stable-diffusion-v1-4)", "unet", SD_V1_UNET_CONFIG, 512, (CLIP_L_ENCODER,), VAE_4, (768,)),
    "sdxl": Model("SDXL (stabilityai/stable-diffusion-xl-base-1.0)", "unet", SDXL_UNET_CONFIG, 1024,
                  (CLIP_L_ENCODER, (CLIPTextModelWithProjection, CLIPTextConfig, OPENCLIP_BIGG)), VAE_4, (768, 1280)),
    "sd35m": Model("SD 3.5 Medium (stabilityai/stable-diffusion-3.5-medium)", "sd3", SD35_MEDIUM_CONFIG, 1024,
                   ((CLIPTextModelWithProjection, CLIPTextConfig, CLIP_L), (CLIPTextModelWithProjection, CLIPTextConfig, OPENCLIP_BIGG),
                    (T5EncoderModel, T5Config, T5_XXL)), VAE_16, text_tokens=77 + 256),
    "sd35l": Model("SD 3.5 Large (stabilityai/stable-diffusion-3.5-large)", "sd3", SD35_LARGE_CONFIG, 1024,
                   ((CLIPTextModelWithProjection, CLIPTextConfig, CLIP_L), (CLIPTextModelWithProjection, CLIPTextConfig, OPENCLIP_BIGG),
                    (T5EncoderModel, T5Config, T5_XXL)), VAE_16, text_tokens=77 + 256),
    "flux": Model("FLUX.1-dev (black-forest-labs/FLUX.1-dev)", "flux", FLUX_DEV_CONFIG, 1024,
                  (CLIP_L_ENCODER, (T5EncoderModel, T5Config, T5_XXL)), VAE_16, text_tokens=512),
}
FLOW = tuple(key for key, m in MODELS.items() if m.family != "unet")
UNITS = ("ResnetBlock2D", "BasicTransformerBlock", "JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")
TWO_STREAMS = ("JointTransformerBlock", "FluxTransformerBlock")  # a checkpointed joint block keeps its text stream's input too


class _FlashLikeAttention(torch.autograd.Function):
    """What a flash / memory-efficient attention kernel saves for its backward (no L x L scores)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the pass is on the meta device
        raise NotImplementedError


@contextlib.contextmanager
def flash_like_attention():
    saved = F.scaled_dot_product_attention
    # in bf16, as autocast runs attention (diffusers calls it with query=, key=, value=)
    F.scaled_dot_product_attention = lambda query, key, value, *a, **kw: _FlashLikeAttention.apply(
        *(t.to(torch.bfloat16) for t in (query, key, value)))
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved


# CUDA autocast's lists (torch/testing/_internal/autocast_test_lists.py), for the ops these models call
_BF16 = {F.linear, F.conv1d, F.conv2d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.baddbmm,
         torch.addmm, torch.einsum}
_FP32 = {F.layer_norm, F.group_norm, F.rms_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.exp,
         torch.Tensor.exp, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.rsqrt, torch.Tensor.rsqrt}


class Bf16Autocast(torch.overrides.TorchFunctionMode):
    """bf16 autocast's casts on meta tensors, which torch.autocast leaves alone (see the module's
    docstring). A parameter is cast once per pass (autocast's cache); its copies' ids are in `copies`."""

    def __init__(self, params: set[int]) -> None:
        super().__init__()
        self.params, self.cache, self.copies = params, {}, set()

    def _cast(self, x, dtype: torch.dtype):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == dtype:
            return x
        if id(x) not in self.params:
            return x.to(dtype)
        if (id(x), dtype) not in self.cache:
            self.cache[id(x), dtype] = copy = x.to(dtype)
            self.copies.add(id(copy))
        return self.cache[id(x), dtype]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.bfloat16 if func in _BF16 else torch.float32 if func in _FP32 else None
        if dtype is not None:
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _inputs(model: Model, side: int) -> tuple[tuple, dict]:
    """One image's call of the denoiser, as erase/families.py's predict makes it."""
    meta = dict(device="meta")
    c = model.config
    if model.family == "sd3":
        return (), dict(hidden_states=torch.randn(1, c["in_channels"], side, side, **meta), timestep=torch.tensor([500.0], **meta),
                        encoder_hidden_states=torch.randn(1, model.text_tokens, c["joint_attention_dim"], **meta),
                        pooled_projections=torch.randn(1, c["pooled_projection_dim"], **meta))
    if model.family == "flux":
        latents = torch.randn(1, c["in_channels"] // 4, side, side, **meta)
        return (), dict(hidden_states=pack_latents(latents), timestep=torch.tensor([0.5], **meta),
                        guidance=torch.tensor([3.5], **meta) if c.get("guidance_embeds") else None,
                        pooled_projections=torch.randn(1, c["pooled_projection_dim"], **meta),
                        encoder_hidden_states=torch.randn(1, model.text_tokens, c["joint_attention_dim"], **meta),
                        txt_ids=torch.zeros(model.text_tokens, 3, **meta), img_ids=latent_image_ids(side, side, "meta", torch.float32))
    kwargs = {}
    if c.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, model.text_dims[-1], **meta), "time_ids": torch.randn(1, 6, **meta)}
    return (torch.randn(1, c["in_channels"], side, side, **meta), torch.tensor([500], **meta),
            torch.randn(1, model.text_tokens, sum(model.text_dims), **meta)), kwargs


def activations(denoiser: torch.nn.Module, model: Model) -> dict[str, int]:
    """Bytes one image's forward saves for the backward: without checkpointing, and with diffusers'
    checkpointing (each unit's input kept, one unit's saved tensors recomputed at a time)."""
    params = {id(p) for p in denoiser.parameters()}
    autocast = Bf16Autocast(params)
    saved: dict[int, int] = {}
    total = [0]

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params and id(base) not in autocast.copies and id(base) not in saved:
            saved[id(base)] = base.untyped_storage().nbytes()
            total[0] += saved[id(base)]
        return t

    units = [m for m in denoiser.modules() if type(m).__name__ in UNITS]
    inside, inputs, start = {}, {}, {}
    handles = []
    for i, m in enumerate(units):
        def pre(mod, args, kwargs, i=i):
            start[i] = total[0]
            kept = [args[0] if args else kwargs.get("hidden_states")]
            if type(mod).__name__ in TWO_STREAMS:
                kept.append(args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states"))
            inputs[i] = sum(x.numel() * x.element_size() for x in kept)

        def post(mod, args, kwargs, out, i=i):
            inside[i] = total[0] - start[i]
        handles += [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post, with_kwargs=True)]
    args, kwargs = _inputs(model, model.resolution // 8)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), flash_like_attention(), autocast:
        denoiser(*args, **kwargs)
    for h in handles:
        h.remove()
    plain = total[0]
    checkpointed = plain - sum(inside.values()) + sum(inputs.values()) + max(inside.values())
    return {"plain": plain, "checkpointed": checkpointed}


def build(model: Model) -> torch.nn.Module:
    cls = {"unet": UNet2DConditionModel, "sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[model.family]
    with torch.device("meta"):
        return cls(**model.config)


def model_sizes(key: str) -> dict:
    model = MODELS[key]
    denoiser = build(model).train()
    for p in denoiser.parameters():
        p.requires_grad_(True)
    with torch.device("meta"):
        encoders = {cls.__name__ + f" ({cfg.get('hidden_size', cfg.get('d_model'))})": count(cls(config_cls(**cfg)))
                    for cls, config_cls, cfg in model.encoders}
        vae = count(AutoencoderKL(**model.vae))
    units = shard_units(denoiser)
    own = lambda m: sum(p.numel() for p in m.parameters()) - sum(count(u) for u in units if u is not m and _inside(u, m))
    largest = max(own(u) for u in units)
    return {"name": model.name, "denoiser": "unet" if model.family == "unet" else "transformer", "resolution": model.resolution,
            "text_tokens": model.text_tokens, "denoiser_parameters": count(denoiser),
            "denoiser_buffers": sum(b.numel() for b in denoiser.buffers()), "largest_unit_parameters": largest,
            "frozen_parameters": sum(encoders.values()) + vae, "frozen": {**encoders, "AutoencoderKL": vae},
            "activations_per_image": activations(denoiser, model)}


def _inside(inner: torch.nn.Module, outer: torch.nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def per_process(sizes: dict, processes: int, masters: str, state: str, checkpointing: bool, batch: int, ratio: float) -> dict:
    """Bytes per process of one configuration (see the module's docstring)."""
    p = sizes["denoiser_parameters"]
    b = 4 if masters == "fp32" else 2
    out = {"weights": p * b / processes, "gradients": p * b / processes}
    if masters == "masked":  # bf16 frozen weights and dense bf16 gradients; fp32 masters and moments of the mask's entries
        if state != "masked":
            raise ValueError("masked masters keep Adam's state for the mask's entries only (state 'masked')")
        out["optimizer"] = 12 * ratio * p / processes
        out["mask_bits"] = p / 8 / processes
    elif state == "dense":
        out["optimizer"] = 2 * p * b / processes
        out["mask_bits"] = p / 8 / processes
    else:
        out["optimizer"] = 2 * ratio * p * b / processes + p / 8 / processes
        out["mask_bits"] = 0.0
    out["buffers"] = sizes.get("denoiser_buffers", 0) * b
    out["autocast_copy"] = 2 * p if masters == "fp32" and processes == 1 else 0.0
    out["gathered_units"] = 3 * sizes["largest_unit_parameters"] * b if processes > 1 else 0.0
    act = sizes["activations_per_image"]["checkpointed" if checkpointing else "plain"]
    out["activations"] = 2 * batch * act
    out["total"] = sum(out.values())
    out["frozen_while_generating"] = sizes["frozen_parameters"] * 2
    return out


def rows_of(key: str, sizes: dict, ratios: tuple[float, ...], batch: int, measured: dict) -> list[dict]:
    """Every configuration of one model: dense state once, masked state and masked masters once per ratio."""
    rows = []
    for processes in PROCESSES:
        for masters, state in MODES:
            for ratio in (None,) if state == "dense" else ratios:
                for checkpointing in (True, False):
                    found = measured.get(checkpointing) if (key, processes, masters, state) == ("sd1", 1, "fp32", "dense") else None
                    rows.append({"model": key, "processes": processes, "masters": masters, "state": state, "ratio": ratio,
                                 "checkpointing": checkpointing,
                                 "measured_peak": f"{found[0]:.2f} GiB on {found[1]}" if found else "not measured",
                                 "bytes": per_process(sizes, processes, masters, state, checkpointing, batch, ratio or 0.0)})
    return rows


def fits(row: dict, card: str) -> bool:
    return row["bytes"]["total"] / GIB <= FITS[card]


def _mode(row: dict) -> str:
    text = "masked masters" if row["masters"] == "masked" else f"{row['masters']} masters, {row['state']} Adam"
    return text + (f", mask {row['ratio']:g}" if row["ratio"] is not None else "") + (", checkpointing" if row["checkpointing"] else "")


# what erase/train.py runs, from the least saving to the most (bf16 masters are computed rows only)
RUNNABLE = (("fp32", "dense"), ("fp32", "masked"), ("masked", "masked"))


def least_saving_fit(rows: list[dict], processes: int, card: str) -> dict | None:
    """The configuration at `processes` that fits `card` and saves least: the first in RUNNABLE's order,
    at it the largest mask ratio, without checkpointing before with; None where none fits."""
    order = lambda r: (RUNNABLE.index((r["masters"], r["state"])), -(r["ratio"] or 1.0), r["checkpointing"])
    found = sorted((r for r in rows if r["processes"] == processes and (r["masters"], r["state"]) in RUNNABLE and fits(r, card)), key=order)
    return found[0] if found else None


def summary(rows: list[dict]) -> list[str]:
    lines = []
    for processes, card in ((1, "80 GB"), (8, "24 GB")):
        where = "one GPU" if processes == 1 else f"{processes} GPUs"
        best = least_saving_fit(rows, processes, card)
        runnable = [r for r in rows if r["processes"] == processes and (r["masters"], r["state"]) in RUNNABLE]
        least = min(runnable, key=lambda r: r["bytes"]["total"])
        if best is None:
            lines.append(f"- {card} per GPU on {where}: nothing erase/train.py runs fits (the leanest, {_mode(least)}, needs "
                         f"{least['bytes']['total'] / GIB:.1f} GiB).")
        else:
            lines.append(f"- {card} per GPU on {where}: the least saving that fits is {_mode(best)} "
                         f"({best['bytes']['total'] / GIB:.1f} GiB); the leanest, {_mode(least)}, {least['bytes']['total'] / GIB:.1f} GiB.")
    return lines


def _row_cells(row: dict) -> str:
    g = {k: v / GIB for k, v in row["bytes"].items()}
    ratio = f"{row['ratio']:g}" if row["ratio"] is not None else "-"
    return (f"| {row['processes']} | {row['masters']} | {row['state']} | {ratio} | {'yes' if row['checkpointing'] else 'no'} | "
            f"{g['weights']:.2f} | {g['gradients']:.2f} | {g['optimizer']:.2f} | {g['mask_bits']:.2f} | {g['buffers']:.2f} | "
            f"{g['autocast_copy']:.2f} | "
            f"{g['gathered_units']:.2f} | {g['activations']:.2f} | **{g['total']:.2f}** | "
            f"{'yes' if fits(row, '24 GB') else 'no'} | {'yes' if fits(row, '80 GB') else 'no'} | {row['measured_peak']} |")


HEADER = ["| processes | masters | Adam state | mask ratio | checkpointing | weights | gradients | optimizer | mask bits | buffers "
          "| autocast copy | gathered units | activations | total | fits 24 GB | fits 80 GB | measured peak |",
          "|---" * 17 + "|"]


def _totals_table(rows: list[dict], checkpointing: bool) -> list[str]:
    """Totals by configuration (rows) and process count (columns)."""
    lines = [f"| masters, Adam state | mask ratio | {' | '.join(f'{n} process' + ('es' if n > 1 else '') for n in PROCESSES)} |",
             "|---|---|" + "---|" * len(PROCESSES)]
    seen = []
    for r in rows:
        if r["checkpointing"] == checkpointing and (r["masters"], r["state"], r["ratio"]) not in seen:
            seen.append((r["masters"], r["state"], r["ratio"]))
    for masters, state, ratio in seen:
        cells = []
        for n in PROCESSES:
            r = next(r for r in rows if (r["masters"], r["state"], r["ratio"], r["checkpointing"], r["processes"])
                     == (masters, state, ratio, checkpointing, n))
            mark = " (24)" if fits(r, "24 GB") else " (80)" if fits(r, "80 GB") else ""
            cells.append(f"{r['bytes']['total'] / GIB:.1f}{mark}")
        label = "masked masters" if masters == "masked" else f"{masters}, {state}"
        lines.append(f"| {label} | {'-' if ratio is None else f'{ratio:g}'} | {' | '.join(cells)} |")
    return lines


def _model_line(sizes: dict) -> str:
    a = sizes["activations_per_image"]
    buffers = f", {sizes['denoiser_buffers'] / 1e6:.0f}M buffer entries (unsharded)" if sizes["denoiser_buffers"] > 1e6 else ""
    frozen = " + ".join(f"{k} {v / 1e9:.2f}B" for k, v in sizes["frozen"].items())
    return (f"{sizes['denoiser_parameters'] / 1e9:.2f}B {sizes['denoiser'].replace('unet', 'UNet')} weights"
            f"{buffers}, largest FSDP unit {sizes['largest_unit_parameters'] / 1e6:.0f}M; activations per image at {sizes['resolution']} px "
            f"{a['plain'] / GIB:.2f} GiB ({a['checkpointed'] / GIB:.2f} GiB with checkpointing); frozen text encoder(s) and VAE "
            f"{sizes['frozen_parameters'] * 2 / GIB:.2f} GiB in bf16 ({frozen}), while the sets are made.")


def flux_sentence(result: dict) -> str:
    rows = [r for r in result["rows"] if r["model"] == "flux"]
    if not rows:
        return ""
    pick = lambda n: next((r for r in rows if (r["processes"], r["masters"], r["ratio"], r["checkpointing"]) == (n, "masked", 0.1, True)), None)
    one, eight = pick(1), pick(8)
    if one is None or eight is None:
        return ""
    verdict = lambda r, card: "fits" if fits(r, card) else "does not fit"
    text = (f"**FLUX.1-dev, SalUn with mask 0.1, masked masters and gradient checkpointing**: {one['bytes']['total'] / GIB:.1f} GiB "
            f"on one GPU, which {verdict(one, '80 GB')} in 80 GB; {eight['bytes']['total'] / GIB:.1f} GiB per GPU on 8, which "
            f"{verdict(eight, '24 GB')} in 24 GB.")
    for r, n, card in ((one, 1, "80 GB"), (eight, 8, "24 GB")):
        if not fits(r, card):
            best = least_saving_fit(rows, n, card)
            text += f" At {n} process(es) in {card}: " + (f"{_mode(best)} does ({best['bytes']['total'] / GIB:.1f} GiB)." if best
                                                           else "no configuration of the table fits.")
    return text


def markdown(result: dict) -> str:
    ratios = ", ".join(f"{r:g}" for r in result["ratios"])
    lines = ["# What fits on a 24 GB or an 80 GB card: SalUn per process, computed from the configs (meta device)", "",
             f"One forget and one retain image per process and step (`--train-batch-size {result['batch']}`), bf16 autocast, "
             f"flash-style attention; mask ratio {result['ratio']:g} for the SD rows, {ratios} for the flow transformers. "
             "GiB per process; a measured peak needs a GPU (bench/sd_gpu.py through bench/gpu_check.sh). "
             "Masters: fp32 (erase/train.py's), bf16 (computed only), masked (`--master-weights masked`: bf16 frozen weights "
             "and bf16 gradients, fp32 masters and Adam moments for the mask's entries only; its optimizer column holds those "
             "12 bytes per entry).", ""]
    flux = flux_sentence(result)
    if flux:
        lines += [flux, ""]
    for key, sizes in result["models"].items():
        rows = [r for r in result["rows"] if r["model"] == key]
        lines += [f"## {sizes['name']}", "", _model_line(sizes), ""]
        if key not in result["flow_models"]:
            lines += HEADER + [_row_cells(r) for r in rows] + [""]
            continue
        lines += ["What erase/train.py runs (fp32 masters with dense or masked Adam, masked masters), by the least it must "
                  "save to fit:"] + summary(rows) + [""]
        lines += ["Total GiB per process with gradient checkpointing; (24): fits 24 GB (and 80 GB), (80): fits 80 GB only.", ""]
        lines += _totals_table(rows, True) + [""]
        lines += ["Without gradient checkpointing:", ""] + _totals_table(rows, False) + [""]
        lines += ["The rows that matter, with checkpointing, mask 0.1 (every row is in memory.json):", ""]
        lines += HEADER + [_row_cells(r) for r in rows if r["checkpointing"] and r["ratio"] in (None, 0.1)] + [""]
    lines += ["fits 24 GB / 80 GB: the total within 22.35 / 74.51 GiB (24 and 80 GB in decimal units; the cards sold as such hold "
              "about 24 and 80 GiB, so the test is conservative by 7%), before the CUDA context and fragmentation.",
              "The mask's phase holds the same gradients and 2 x `--saliency-batch-size` images' activations (the conditional "
              "and unconditional passes): on a 24 GB card give SDXL and the flow transformers `--saliency-batch-size 1`.",
              "bf16 masters are a computed row only: erase/train.py keeps fp32 masters under `--mixed-precision bf16`.",
              "autocast copy: with fp32 masters on one process, autocast's bf16 copy of the weights (2 bytes per parameter, "
              "cached through the forward and saved for the backward); sharded, FSDP gathers each unit in bf16 instead.",
              "Activations: bf16 autocast's casts are made by hand on the meta device (torch.autocast leaves meta tensors alone: "
              "an earlier version of this table counted them in fp32: 1.5 to 1.7 times these).", "",
              f"Machine: {result['machine']}" + ("" if result["measured"] else " (computed, nothing measured).")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1, help="--train-batch-size per process")
    parser.add_argument("--ratio", type=float, default=0.5, help="the mask ratio of the SD 1.x and SDXL rows")
    parser.add_argument("--ratios", default="0.5 0.1 0.01", help="the mask ratios of the flow transformers' rows")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--measured", nargs="*", default=[], metavar="SD_GPU.json", help="bench/sd_gpu.py results to set beside")
    parser.add_argument("--out", default="bench/results/memory.json")
    args = parser.parse_args()
    ratios = tuple(float(r) for r in args.ratios.replace(",", " ").split())
    measured = {}  # checkpointing -> (peak GiB of the training phase, device), SD 1.x at --batch per process
    for path in args.measured:
        run = json.loads(Path(path).read_text())
        if run["settings"]["train_batch_size"] == args.batch and not run["model"].endswith("(tiny config)"):
            measured[bool(run["settings"]["gradient_checkpointing"])] = (run["peak_memory_gib"]["train"], run["device"])
    models = {key: model_sizes(key) for key in args.models}
    rows = [row for key, sizes in models.items()
            for row in rows_of(key, sizes, ratios if key in FLOW else (args.ratio,), args.batch, measured)]
    result = {"batch": args.batch, "ratio": args.ratio, "ratios": list(ratios), "flow_models": [k for k in models if k in FLOW],
              "models": models, "rows": rows, "measured": args.measured, "machine": machine()}
    text = markdown(result)
    save_results(result, args.out, text)
    print(text)


if __name__ == "__main__":
    main()
