"""Saliency mask on the full-size SD-1.x UNet architecture (random weights from its config,
nothing downloaded): time, peak RSS and mask file size, on the CPU.

    python bench/mask_memory.py --out bench/results/mask_memory.json
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from erase.objectives import saliency_loss
from erase.saliency import compute_saliency_mask, global_topk_mask, mask_fraction, save_mask
from erase.sd import SD_V1_UNET_CONFIG

from common import machine, save_results  # bench/common.py (the scripts run from bench/)


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", default="bench/results/mask_memory.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD_V1_UNET_CONFIG)
    n_params = sum(p.numel() for p in unet.parameters())
    param_gib = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**30
    rss_model = rss_gib()

    b, s = args.batch_size, args.latent_size
    batch = dict(
        noisy_latents=torch.randn(b, 4, s, s),
        timesteps=torch.randint(0, 1000, (b,)),
        noise=torch.randn(b, 4, s, s),
        encoder_hidden_states=torch.randn(b, 77, 768),
        uncond_hidden_states=torch.randn(b, 77, 768),
    )
    start = time.perf_counter()
    mask = compute_saliency_mask(unet, lambda m, kw: saliency_loss(m, **kw), [batch], args.ratio, show_progress=False)
    seconds_total = time.perf_counter() - start
    peak = peak_rss_gib()

    # the threshold alone, on scores of the same size (gradients are gone by now)
    scores = {n: torch.rand_like(p) for n, p in unet.named_parameters()}
    start = time.perf_counter()
    global_topk_mask(scores, args.ratio)
    seconds_threshold = time.perf_counter() - start
    del scores

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "saliency_mask.safetensors"
        start = time.perf_counter()
        save_mask(mask, path)
        seconds_save = time.perf_counter() - start
        mask_bytes = path.stat().st_size

    result = {
        "model": "SD-1.x UNet2DConditionModel (CompVis/stable-diffusion-v1-4 config, random weights)",
        "parameters": n_params,
        "parameter_gib": param_gib,
        "latent_size": s,
        "batch_size": b,
        "ratio": args.ratio,
        "kept_fraction": mask_fraction(mask),
        "seconds_mask_total": seconds_total,
        "seconds_threshold_only": seconds_threshold,
        "seconds_save": seconds_save,
        "rss_after_model_gib": rss_model,
        "peak_rss_gib": peak,
        "peak_extra_over_model_gib": peak - rss_model,
        "peak_extra_over_param_bytes": (peak - rss_model) / param_gib,
        "mask_file_bytes": mask_bytes,
        "mask_file_mb": mask_bytes / 1e6,
        "reference_int64_mask_gb": n_params * 8 / 1e9,
        "threads": torch.get_num_threads(),
        "machine": machine(),
    }
    md = [
        "# Saliency mask on the full-size SD-1.x UNet (CPU)",
        "",
        "| parameters | latents | mask time (s) | threshold only (s) | peak RSS (GiB) | extra over model (GiB) | mask file (MB) | "
        "reference int64 (GB) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {n_params:,} | {b}x4x{s}x{s} | {seconds_total:.1f} | {seconds_threshold:.1f} | {peak:.2f} | "
        f"{peak - rss_model:.2f} ({(peak - rss_model) / param_gib:.2f}x params) | {mask_bytes / 1e6:.1f} | {n_params * 8 / 1e9:.1f} |",
        "",
        f"Machine: {result['machine']}. Peak extra includes activations of one forward/backward pass.",
    ]
    save_results(result, args.out, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
