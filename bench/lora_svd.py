"""The SVD of a LoRA export on the full-size SD 1.x UNet, randomized against full (CPU).

For every Linear and Conv2d weight of CompVis/stable-diffusion-v1-4's UNet (its config, random values:
nothing is downloaded), a synthetic change (half the entries moved, as under a SalUn mask) is cut to
rank `--rank` by `erase.export.lora.factorize`, once with
the randomized SVD it takes at small ranks and once with the full SVD it took before, for two kinds of
change. Reported: the seconds of each, one thread (as the export runs it), and the share of the change's
energy each keeps.

    python bench/lora_svd.py --out bench/results/lora_svd.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import machine, save_results  # bench/common.py (the scripts run from bench/)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from erase.export import lora  # noqa: E402
from erase.sd import SD_V1_UNET_CONFIG  # noqa: E402


def shapes() -> list[tuple[str, tuple[int, ...]]]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD_V1_UNET_CONFIG)
    out = []
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            out.append((f"{name}.weight", tuple(module.weight.shape)))
    return out


def change(shape: tuple[int, ...], g: torch.Generator, kind: str) -> torch.Tensor:
    """Half the entries moved: by a rank-32 product with a decaying spectrum plus noise ("decaying"), or by
    noise alone ("flat": the hardest case for a randomized SVD, whose top directions are then ill-defined)."""
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    if kind == "decaying":
        k = min(32, rows, cols)
        low = torch.randn(rows, k, generator=g) @ (torch.randn(k, cols, generator=g) * torch.logspace(0, -2, k)[:, None])
        delta = 1e-3 * low + 1e-6 * torch.randn(rows, cols, generator=g)
    else:
        delta = 1e-5 * torch.randn(rows, cols, generator=g)
    return (delta * (torch.rand(rows, cols, generator=g) < 0.5)).reshape(shape)


def run(rank: int, randomized: bool, layers, seed: int, kind: str) -> dict:
    saved = lora.OVERSAMPLE
    if not randomized:
        lora.OVERSAMPLE = 10**9  # the full SVD for every layer, as before
    g = torch.Generator().manual_seed(seed)
    seconds, kept, total, used = 0.0, 0.0, 0.0, 0
    try:
        for _, shape in layers:
            delta = change(shape, g, kind)
            start = time.perf_counter()
            _, _, k = lora.factorize(delta, rank)
            seconds += time.perf_counter() - start
            kept += k
            total += float(delta.float().square().sum())
            matrix_min = min(shape[0], int(torch.tensor(shape[1:]).prod()))
            used += int(matrix_min >= lora.RANDOMIZED_FROM and (rank + lora.OVERSAMPLE) * 4 <= matrix_min)
    finally:
        lora.OVERSAMPLE = saved
    return {"seconds": round(seconds, 2), "energy_kept": kept / total, "randomized_layers": used}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/lora_svd.json")
    args = parser.parse_args()
    layers = shapes()
    runs = {f"{kind} {name}": run(args.rank, name == "randomized", layers, args.seed, kind)
            for kind in ("decaying", "flat") for name in ("randomized", "full")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit, "machine": machine(1),
              "model": "SD 1.x UNet (CompVis/stable-diffusion-v1-4 config, random values)", "rank": args.rank,
              "layers": len(layers), "runs": runs}
    rows = [f"| {name} | {r['seconds']:.1f} | {100 * r['energy_kept']:.4f}% | {r['randomized_layers']} |" for name, r in runs.items()]
    markdown = "\n".join([
        f"# The SVD of a rank-{args.rank} LoRA export, SD 1.x UNet ({len(layers)} Linear / Conv2d weights, CPU, one thread)", "",
        f"`{result['command']}` at {commit}; {result['machine']}.", "",
        "| change, SVD | seconds | energy of the change kept | layers by randomized SVD |",
        "|---|---|---|---|", *rows, "",
        "Randomized: the export's rule now (640-wide and wider layers); full: every layer, as before. The changes "
        "are synthetic, not a trained erasure's: half the entries of each weight moved by a rank-32 product with a "
        "decaying spectrum plus noise (decaying), or by noise alone (flat). Loading the two pipelines and writing "
        "the file are not timed.", ""])
    save_results(result, args.out, markdown)
    print(markdown)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
