"""Time per SalUn step and peak memory on the full-size SD-1.x UNet architecture (random
weights, nothing downloaded): the teacher pass for c', one forward/backward over the forget
and retain halves, Adam, and the masked update under a 0.5 mask.

    python bench/speed.py --device cpu --latent-size 16 --batch-size 1 --out bench/results/speed_cpu.json
    python bench/speed.py --device cuda --mixed-precision bf16 --latent-size 64 --batch-size 8 [--gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from erase.erasure import masked_optimizer
from erase.objectives import salun_loss
from erase.sd import SD_V1_UNET_CONFIG

from common import machine, save_results  # bench/common.py (the scripts run from bench/)


def make_batch(b: int, s: int, device: str) -> tuple[dict, dict]:
    forget = {
        "noisy_latents": torch.randn(b, 4, s, s, device=device),
        "timesteps": torch.randint(0, 1000, (b,), device=device),
        "encoder_hidden_states": torch.randn(b, 77, 768, device=device),
        "anchor_hidden_states": torch.randn(b, 77, 768, device=device),
    }
    retain = {
        "noisy_latents": torch.randn(b, 4, s, s, device=device),
        "timesteps": torch.randint(0, 1000, (b,), device=device),
        "encoder_hidden_states": torch.randn(b, 77, 768, device=device),
        "target": torch.randn(b, 4, s, s, device=device),
    }
    return forget, retain


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--latent-size", type=int, default=16, help="64 = 512 px images")
    parser.add_argument("--batch-size", type=int, default=1, help="forget and retain images per step")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="bench/results/speed_cpu.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD_V1_UNET_CONFIG).to(args.device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(0)  # a random half: step cost does not depend on which half
    mask = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in unet.named_parameters()}
    optimizer, _ = masked_optimizer(unet, mask, learning_rate=1e-5)  # erase/train.py's optimizer
    del mask
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    autocast = lambda: torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None)
    forget, retain = make_batch(args.batch_size, args.latent_size, args.device)

    def step() -> None:
        with autocast():
            loss, _ = salun_loss(unet, forget, retain, beta=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = FlopCounterMode(display=False)
    with flops:  # the first step doubles as warm-up
        step()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    result = {
        "model": "SD-1.x UNet2DConditionModel (CompVis/stable-diffusion-v1-4 config, random weights)",
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "mixed_precision": args.mixed_precision,
        "latent_size": args.latent_size,
        "image_size": args.latent_size * 8,
        "batch_size": args.batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "seconds_per_step": seconds,
        "step_times": times,
        "peak_memory_gib": peak_memory_gib(args.device),
        "flops_per_step": flops.get_total_flops(),
        "tflops_per_s": flops.get_total_flops() / seconds / 1e12,
        "threads": torch.get_num_threads(),
        "machine": machine(),
    }
    md = [
        "# SalUn step on the full-size SD-1.x UNet",
        "",
        "| device | precision | image | batch | checkpointing | s / step | peak memory (GiB) | TFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
        f"| {result['device']} | {args.mixed_precision} | {result['image_size']} px | {args.batch_size}+{args.batch_size} | "
        f"{args.gradient_checkpointing} | {seconds:.2f} | {result['peak_memory_gib']:.2f} | {result['tflops_per_s']:.3f} |",
        "",
        "One step: teacher forward for c' (no grad), forward+backward over forget and retain, Adam, masked update.",
        "FLOPs counted by torch.utils.flop_counter; CPU memory is peak RSS, GPU memory is max allocated.",
    ]
    save_results(result, args.out, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
