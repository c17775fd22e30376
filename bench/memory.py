"""Per-process memory of a SalUn erasure on SD 1.x and SDXL, computed from their configs on the
meta device (nothing is allocated or downloaded): what fits on a 24 GB card.

For 1, 2, 4 and 8 processes (FSDP2, erase/sharding.py), dense and masked-state Adam
(`--optimizer-state`), fp32 and bf16 master weights, with and without gradient checkpointing:
- weights, gradients and Adam's moments: their bytes over the processes (FSDP shards all three);
  masked state keeps the moments of the mask's entries only plus the mask's bits; the dense path
  holds the mask's bits for MaskedUpdate;
- gathered units: FSDP holds the largest unit of erase.sharding.shard_units unsharded, plus the
  next one prefetched and the unit's unsharded gradients in its backward (three times the largest
  unit; none on one process);
- activations: the tensors one image's UNet forward saves for its backward, counted with
  `saved_tensors_hooks` on the meta device under bf16 autocast, with attention saving what a
  flash / memory-efficient kernel saves (q, k, v, output, log-sum-exp) and not the score matrix.
  Gradient checkpointing (diffusers: each resnet and transformer layer) keeps each unit's input
  and recomputes one unit at a time. A SalUn step takes a forget and a retain image per
  `--train-batch-size`, so a step holds 2 x batch x that.
The frozen text encoder(s) and VAE (bf16) are on the GPU while the image sets are generated and
encoded, then leave it (erase/families.py's release_frozen): shown apart, not in the total.
Not counted: the CUDA context and the allocator's fragmentation (a few hundred MB to a GB or two),
the cached latents (50 MB for 800 SD images).
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
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from erase.sd import SD_V1_UNET_CONFIG
from erase.sharding import shard_units

from common import machine, save_results  # bench/common.py (the scripts run from bench/)

GIB = 2**30

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: 2.57B weights
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408,
              max_position_embeddings=77, projection_dim=768)
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, vocab_size=49408,
                     max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")


@dataclass
class Model:
    name: str
    unet: dict
    resolution: int
    text_dims: tuple[int, ...]  # the hidden states the UNet attends to (concatenated for SDXL)
    encoders: tuple[tuple[type, dict], ...]


MODELS = {
    "sd1": Model("SD 1.x (CompVis/stable-diffusion-v1-4)", SD_V1_UNET_CONFIG, 512, (768,), ((CLIPTextModel, CLIP_L),)),
    "sdxl": Model("SDXL (stabilityai/stable-diffusion-xl-base-1.0)", SDXL_UNET_CONFIG, 1024, (768, 1280),
                  ((CLIPTextModel, CLIP_L), (CLIPTextModelWithProjection, OPENCLIP_BIGG))),
}


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
    saved = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, *a, **kw: _FlashLikeAttention.apply(q, k, v)
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = saved


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def activations(unet: UNet2DConditionModel, model: Model) -> dict[str, int]:
    """Bytes one image's forward saves for the backward: without checkpointing, and with diffusers'
    checkpointing (each unit's input kept, one unit's saved tensors recomputed at a time)."""
    params = {id(p) for p in unet.parameters()}
    saved: dict[int, int] = {}
    total = [0]

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params and id(base) not in saved:
            saved[id(base)] = base.untyped_storage().nbytes()
            total[0] += saved[id(base)]
        return t

    units = [m for m in unet.modules() if type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock")]
    inside, inputs, start = {}, {}, {}
    handles = []
    for i, m in enumerate(units):
        def pre(mod, args, kwargs, i=i):
            start[i] = total[0]
            x = args[0] if args else kwargs.get("hidden_states")
            inputs[i] = x.numel() * x.element_size()

        def post(mod, args, kwargs, out, i=i):
            inside[i] = total[0] - start[i]
        handles += [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post, with_kwargs=True)]
    side = model.resolution // 8
    kwargs = {}
    if model.unet.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, model.text_dims[-1], device="meta"),
                                       "time_ids": torch.randn(1, 6, device="meta")}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16), flash_like_attention():
        unet(torch.randn(1, 4, side, side, device="meta"), torch.tensor([500], device="meta"),
             torch.randn(1, 77, sum(model.text_dims), device="meta"), **kwargs)
    for h in handles:
        h.remove()
    plain = total[0]
    checkpointed = plain - sum(inside.values()) + sum(inputs.values()) + max(inside.values())
    return {"plain": plain, "checkpointed": checkpointed}


def model_sizes(key: str) -> dict:
    model = MODELS[key]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**model.unet).train()
        for p in unet.parameters():
            p.requires_grad_(True)
        frozen = sum(count(cls(CLIPTextConfig(**cfg))) for cls, cfg in model.encoders) + count(AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4))
    units = shard_units(unet)
    own = lambda m: sum(p.numel() for p in m.parameters()) - sum(count(u) for u in units if u is not m and _inside(u, m))
    largest = max(own(u) for u in units)
    return {"name": model.name, "resolution": model.resolution, "unet_parameters": count(unet),
            "largest_unit_parameters": largest, "frozen_parameters": frozen, "activations_per_image": activations(unet, model)}


def _inside(inner: torch.nn.Module, outer: torch.nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def per_process(sizes: dict, processes: int, masters: str, state: str, checkpointing: bool, batch: int, ratio: float) -> dict:
    """Bytes per process of one configuration (see the module's docstring)."""
    p = sizes["unet_parameters"]
    b = 4 if masters == "fp32" else 2
    out = {"weights": p * b / processes, "gradients": p * b / processes}
    if state == "dense":
        out["optimizer"] = 2 * p * b / processes
        out["mask_bits"] = p / 8 / processes
    else:
        out["optimizer"] = 2 * ratio * p * b / processes + p / 8 / processes
        out["mask_bits"] = 0.0
    out["gathered_units"] = 3 * sizes["largest_unit_parameters"] * b if processes > 1 else 0.0
    act = sizes["activations_per_image"]["checkpointed" if checkpointing else "plain"]
    out["activations"] = 2 * batch * act
    out["total"] = sum(out.values())
    out["frozen_while_generating"] = sizes["frozen_parameters"] * 2
    return out


def markdown(result: dict) -> str:
    lines = ["# What fits on a 24 GB card: SalUn per process, computed from the configs (meta device)", "",
             f"One forget and one retain image per process and step (`--train-batch-size {result['batch']}`), mask ratio "
             f"{result['ratio']}, bf16 autocast, flash-style attention. GiB per process; a measured peak needs a GPU "
             "(bench/sd_gpu.py through bench/gpu_check.sh).", ""]
    for key, sizes in result["models"].items():
        a = sizes["activations_per_image"]
        lines += [f"**{sizes['name']}**: {sizes['unet_parameters'] / 1e9:.2f}B UNet weights, largest FSDP unit "
                  f"{sizes['largest_unit_parameters'] / 1e6:.0f}M; activations per image at {sizes['resolution']} px "
                  f"{a['plain'] / GIB:.2f} GiB ({a['checkpointed'] / GIB:.2f} GiB with checkpointing); frozen text "
                  f"encoder(s) and VAE {sizes['frozen_parameters'] * 2 / GIB:.2f} GiB (bf16, while the sets are made).", "",
                  "| processes | masters | Adam state | checkpointing | weights | gradients | optimizer | mask bits | gathered units "
                  "| activations | total | fits 24 GB | measured peak |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in result["rows"]:
            if row["model"] != key:
                continue
            g = {k: v / GIB for k, v in row["bytes"].items()}
            lines.append(f"| {row['processes']} | {row['masters']} | {row['state']} | {'yes' if row['checkpointing'] else 'no'} | "
                         f"{g['weights']:.2f} | {g['gradients']:.2f} | {g['optimizer']:.2f} | {g['mask_bits']:.2f} | "
                         f"{g['gathered_units']:.2f} | {g['activations']:.2f} | **{g['total']:.2f}** | "
                         f"{'yes' if g['total'] <= 22.35 else 'no'} | {row['measured_peak']} |")
        lines.append("")
    lines += ["fits 24 GB: the total within 22.35 GiB (24 GB = 22.35 GiB), before the CUDA context and fragmentation.",
              "The mask's phase holds the same gradients and 2 x `--saliency-batch-size` images' activations (the conditional "
              "and unconditional passes): on a 24 GB card give SDXL `--saliency-batch-size 1`.",
              "bf16 masters are a computed row only: erase/train.py keeps fp32 masters under `--mixed-precision bf16`.", "",
              f"Machine: {result['machine']}" + ("" if result["measured"] else " (computed, nothing measured).")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1, help="--train-batch-size per process")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--measured", nargs="*", default=[], metavar="SD_GPU.json", help="bench/sd_gpu.py results to set beside")
    parser.add_argument("--out", default="bench/results/memory.json")
    args = parser.parse_args()
    measured = {}  # checkpointing -> (peak GiB of the training phase, device), SD 1.x at --batch per process
    for path in args.measured:
        run = json.loads(Path(path).read_text())
        if run["settings"]["train_batch_size"] == args.batch and not run["model"].endswith("(tiny config)"):
            measured[bool(run["settings"]["gradient_checkpointing"])] = (run["peak_memory_gib"]["train"], run["device"])
    models = {key: model_sizes(key) for key in MODELS}
    rows = []
    for key, sizes in models.items():
        for processes in (1, 2, 4, 8):
            for masters in ("fp32", "bf16"):
                for state in ("dense", "masked"):
                    for checkpointing in (True, False):
                        found = measured.get(checkpointing) if (key, processes, masters, state) == ("sd1", 1, "fp32", "dense") else None
                        rows.append({"model": key, "processes": processes, "masters": masters, "state": state,
                                     "checkpointing": checkpointing,
                                     "measured_peak": f"{found[0]:.2f} GiB on {found[1]}" if found else "not measured",
                                     "bytes": per_process(sizes, processes, masters, state, checkpointing, args.batch, args.ratio)})
    result = {"batch": args.batch, "ratio": args.ratio, "models": models, "rows": rows, "measured": args.measured, "machine": machine()}
    text = markdown(result)
    save_results(result, args.out, text)
    print(text)


if __name__ == "__main__":
    main()
