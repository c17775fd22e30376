"""The paper's nudity recipe end to end on the Stable Diffusion v1.4 architecture (random
weights, nothing downloaded): `accelerate launch erase/train.py` as a user runs it, then the
output reloaded with plain diffusers in a fresh process and checked bit for bit.

    python bench/sd_gpu.py --mixed-precision bf16                           # 800+800 images, 100 steps
    python bench/sd_gpu.py --mixed-precision bf16 --num-images 160          # scaled: rates + projection
    python bench/sd_gpu.py --tiny --out /tmp/sd_tiny.json                   # the same path, tiny, on the CPU

Per phase (from the run's erase_config.json): seconds and peak allocated GPU memory for
generating and encoding D_f and D_r, the saliency mask and training; seconds for saving.
Rates: images/s, s/step, TFLOP/s of a SalUn step (FLOPs counted on the meta device) and the
fraction of the device's dense bf16 peak. A scaled run also reports the full recipe's time
"projected from measured rates".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from erase.objectives import salun_loss
from erase.sd import SD_V1_UNET_CONFIG

from common import machine, save_results  # bench/common.py (the scripts run from bench/)

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s), by device-name substring.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0, "A10G": 70.0}
PAPER = dict(num_images=800, generation_steps=50, max_train_steps=100, train_batch_size=8)

# The rest of CompVis/stable-diffusion-v1-4 (vae/ and text_encoder/ config.json)
SD_V1_VAE_CONFIG = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=512, scaling_factor=0.18215)
SD_V1_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TINY_UNET_CONFIG = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, norm_num_groups=8)
TINY_VAE_CONFIG = dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=16, norm_num_groups=8)
TINY_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=77)


def build_pipeline(out: Path, tiny: bool) -> dict[str, float]:
    """Save a pipeline of the SD v1.4 architecture (or a tiny one) with random weights; its sizes."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erase.digits import build_tokenizer

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 1B weights: seconds on a GPU
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else SD_V1_UNET_CONFIG))
        vae = AutoencoderKL(**(TINY_VAE_CONFIG if tiny else SD_V1_VAE_CONFIG))
        text_encoder = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT_CONFIG if tiny else SD_V1_TEXT_CONFIG)))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in
            [("unet", unet), ("vae", vae), ("text_encoder", text_encoder)]}


def step_flops(tiny: bool, batch: int, latent: int, cross_dim: int) -> int:
    """FLOPs of one SalUn step (teacher pass for c', forward+backward over forget and retain),
    counted on the meta device: no memory, no compute."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else SD_V1_UNET_CONFIG))
        x = lambda *shape: torch.randn(*shape)
        t = torch.zeros(batch, dtype=torch.long)
        forget = {"noisy_latents": x(batch, 4, latent, latent), "timesteps": t,
                  "encoder_hidden_states": x(batch, 77, cross_dim), "anchor_hidden_states": x(batch, 77, cross_dim)}
        retain = {"noisy_latents": x(batch, 4, latent, latent), "timesteps": t,
                  "encoder_hidden_states": x(batch, 77, cross_dim), "target": x(batch, 4, latent, latent)}
        counter = FlopCounterMode(display=False)
        with counter:
            loss, _ = salun_loss(unet, forget, retain, beta=0.1)
            loss.backward()
    return counter.get_total_flops()


# Runs in a fresh interpreter that never imports this project: plain diffusers, safetensors, numpy.
CHECK = r"""
import json, sys, numpy as np, torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
original, erased = sys.argv[1], sys.argv[2]
a = StableDiffusionPipeline.from_pretrained(original)
b = StableDiffusionPipeline.from_pretrained(erased)
assert not any(m == "erase" or m.startswith("erase.") for m in sys.modules)
same = lambda x, y: all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values()))
out = {"loads": True, "text_encoder_identical": same(a.text_encoder, b.text_encoder), "vae_identical": same(a.vae, b.vae),
       "unet_dtype": str(b.unet.dtype)}
before, after = dict(a.unet.named_parameters()), dict(b.unet.named_parameters())
masked_out_same, moved, kept = True, 0, 0
with safe_open(erased + "/saliency_mask.safetensors", "pt") as f:
    shapes = json.loads(f.metadata()["shapes"])
    for name, shape in shapes.items():
        m = torch.from_numpy(np.unpackbits(f.get_tensor(name).numpy(), count=int(np.prod(shape))).astype(bool)).view(shape)
        masked_out_same &= torch.equal(after[name].detach()[~m], before[name].detach()[~m])
        moved += int((after[name].detach()[m] != before[name].detach()[m]).sum())
        kept += int(m.sum())
out.update(masked_out_unet_identical=bool(masked_out_same), salient_weights_moved=moved / max(kept, 1))
print(json.dumps(out))
"""


def run(args) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sd_gpu-"))
    original, erased, cache = work / "sd-v1.4-random", work / "erased", work / "cache"
    start = time.perf_counter()
    sizes = build_pipeline(original, args.tiny)
    seconds_build = time.perf_counter() - start

    train_args = [
        "--model", str(original), "--concept", "nudity", "--method", args.method,
        "--num-images", str(args.num_images), "--generation-steps", str(args.generation_steps),
        "--max-train-steps", str(args.max_train_steps), "--train-batch-size", str(args.train_batch_size),
        "--generation-batch-size", str(args.generation_batch_size), "--mixed-precision", args.mixed_precision,
        "--checkpointing-steps", "0", "--output-dir", str(erased), "--cache-dir", str(cache), "--overwrite",
    ] + (["--resolution", str(args.resolution)] if args.resolution else []) \
      + (["--gradient-checkpointing"] if args.gradient_checkpointing else []) \
      + (["--adversarial"] if args.adversarial else [])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", args.mixed_precision, "--dynamo_backend", "no"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(launch + [str(ROOT / "erase" / "train.py"), *train_args], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    seconds_wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"erase/train.py failed:\n{proc.stderr[-4000:]}")
    record = json.loads((erased / "erase_config.json").read_text())

    check = subprocess.run([sys.executable, "-c", CHECK, str(original), str(erased)], env=env, cwd="/",
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"reloading the output failed:\n{check.stderr[-4000:]}")
    reload = json.loads(check.stdout.strip().splitlines()[-1])

    seconds = record["seconds"]
    unet_config, vae_config = (TINY_UNET_CONFIG, TINY_VAE_CONFIG) if args.tiny else (SD_V1_UNET_CONFIG, SD_V1_VAE_CONFIG)
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)  # pixels per latent
    resolution = args.resolution or unet_config["sample_size"] * scale  # the pipeline's default
    flops = step_flops(args.tiny, args.train_batch_size, resolution // scale, unet_config["cross_attention_dim"])
    s_per_step = seconds["train"] / max(1, args.max_train_steps)
    device = record["device"]
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_name), None) if args.peak_tflops is None else args.peak_tflops
    images = 2 * args.num_images
    rates = {"images_per_s": images / seconds["data"],
             "generation_s_per_image_step": seconds["data"] / (images * args.generation_steps),
             "mask_s_per_image": seconds["mask"] / args.num_images, "s_per_step": s_per_step}
    projected = (2 * PAPER["num_images"] * PAPER["generation_steps"] * rates["generation_s_per_image_step"]
                 + PAPER["num_images"] * rates["mask_s_per_image"] + PAPER["max_train_steps"] * s_per_step + seconds["save"])
    return {
        "model": "Stable Diffusion v1.4 architecture, random weights" + (" (tiny config)" if args.tiny else ""),
        "parameters_millions": sizes,
        "device": device_name,
        "settings": {k: getattr(args, k) for k in ("method", "mixed_precision", "num_images", "generation_steps",
                                                   "max_train_steps", "train_batch_size", "generation_batch_size",
                                                   "gradient_checkpointing", "adversarial")} | {"resolution": resolution},
        "paper_recipe": all(getattr(args, k) == v for k, v in PAPER.items()) and resolution == 512,
        "seconds": {"build_pipeline": seconds_build, **seconds, "train_py_wall": seconds_wall},
        "peak_memory_gib": record["peak_memory_gib"],
        "rates": rates,
        "flops_per_step": flops,
        "tflops_per_s": flops / s_per_step / 1e12,
        "bf16_peak_tflops": peak,
        "fraction_of_bf16_peak": flops / s_per_step / 1e12 / peak if peak else None,
        "full_recipe_seconds_projected_from_measured_rates": projected,
        "reload": reload,
        "final_losses": record["final_losses"],
        "machine": machine(),
    }


def markdown(r: dict) -> str:
    s, mem, rates = r["seconds"], r["peak_memory_gib"], r["rates"]
    gib = lambda v: "n/a (not CUDA)" if v is None else f"{v:.1f}"
    st = r["settings"]
    ok = r["reload"]
    lines = [
        f"# SalUn nudity recipe end to end: {r['model']}",
        "",
        f"{r['device']}, {st['mixed_precision']}, {st['resolution']} px, {st['num_images']}+{st['num_images']} images at "
        f"{st['generation_steps']} steps, {st['max_train_steps']} steps of {st['train_batch_size']}+{st['train_batch_size']}, "
        f"gradient checkpointing {st['gradient_checkpointing']}, method {st['method']}"
        + (" with --adversarial (the inner attack's rounds inside training)." if st.get("adversarial") else "."),
        "",
        "| phase | seconds | peak allocated (GiB) |",
        "|---|---|---|",
        f"| generate + encode D_f, D_r | {s['data']:.1f} | {gib(mem['data'])} |",
        f"| saliency mask | {s['mask']:.1f} | {gib(mem['mask'])} |",
        f"| training | {s['train']:.1f} | {gib(mem['train'])} |",
        f"| saving | {s['save']:.1f} | |",
        f"| whole `accelerate launch erase/train.py` | {s['train_py_wall']:.1f} | |",
        "",
        f"- {rates['images_per_s']:.2f} images/s at {st['generation_steps']} sampler steps (generation and encoding); "
        f"{rates['s_per_step']:.3f} s per SalUn step; "
        f"{r['tflops_per_s']:.1f} TFLOP/s" + (f" = {100 * r['fraction_of_bf16_peak']:.0f}% of the {r['bf16_peak_tflops']:.0f} TFLOP/s "
                                               "dense bf16 peak" if r["fraction_of_bf16_peak"] else "") + ".",
        ("- This was the paper's recipe." if r["paper_recipe"] else
         f"- Full recipe (800+800 images, 50 steps, mask on 800, 100 steps): "
         f"{r['full_recipe_seconds_projected_from_measured_rates']:.0f} s, projected from measured rates."),
        f"- Reloaded with plain `StableDiffusionPipeline.from_pretrained` in a fresh process: loads {ok['loads']}; "
        f"masked-out UNet weights identical {ok['masked_out_unet_identical']}; text encoder identical "
        f"{ok['text_encoder_identical']}; VAE identical {ok['vae_identical']}; UNet saved as {ok['unet_dtype']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny config on whatever device there is (a test)")
    parser.add_argument("--method", default="salun", choices=["salun", "rl", "esd-x", "esd-u"])
    parser.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--num-images", type=int, default=PAPER["num_images"])
    parser.add_argument("--generation-steps", type=int, default=PAPER["generation_steps"])
    parser.add_argument("--max-train-steps", type=int, default=PAPER["max_train_steps"])
    parser.add_argument("--train-batch-size", type=int, default=PAPER["train_batch_size"])
    parser.add_argument("--generation-batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's (512; 16 with --tiny)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--adversarial", action="store_true", help="train against concept inversion (erase/train.py --adversarial)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--workdir", default=None, help="keep the pipelines here (default: a temporary folder)")
    parser.add_argument("--out", default="bench/results/sd_gpu.json")
    args = parser.parse_args()
    if args.tiny and args.num_images == PAPER["num_images"]:
        args.num_images, args.generation_steps, args.max_train_steps, args.train_batch_size = 4, 2, 3, 2
    result = run(args)
    text = markdown(result)
    save_results(result, args.out, text)
    print(text)


if __name__ == "__main__":
    main()
