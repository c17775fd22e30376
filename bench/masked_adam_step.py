"""One optimizer step on the full-size SD 1.x UNet: MaskedAdam against dense Adam + MaskedUpdate.

The UNet of CompVis/stable-diffusion-v1-4's config with random weights (nothing is downloaded), a
random SalUn-like mask (each weight kept with probability `--ratio`) and random gradients; the step
of each optimizer an erasure can run (`--optimizer-state dense`: torch.optim.Adam confined by
MaskedUpdate; `--optimizer-state masked`: MaskedAdam) is timed over `--steps` steps after one warm-up
step. Reported: the median and range of the step's seconds, the optimizer state's bytes and, on a GPU,
the device-to-host synchronisations of one step.

    python bench/masked_adam_step.py --out bench/results/masked_adam_step.json
    python bench/masked_adam_step.py --device cuda --out bench/results/masked_adam_step_cuda.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings
from pathlib import Path

import torch

from erase.masked_adam import MaskedAdam, optimizer_state_bytes
from erase.saliency import MaskedUpdate
from erase.sd import SD_V1_UNET_CONFIG

from common import machine, save_results  # bench/common.py (the scripts run from bench/)
from sd_gpu import TINY_UNET_CONFIG

ROOT = Path(__file__).resolve().parents[1]


def build(ratio: float, device: str, tiny: bool = False) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else SD_V1_UNET_CONFIG))
    g = torch.Generator().manual_seed(1)
    mask = {n: torch.rand(p.shape, generator=g) < ratio for n, p in unet.named_parameters()}
    return unet, mask


def time_steps(kind: str, ratio: float, steps: int, device: str, tiny: bool = False) -> dict:
    """Seconds per step (and, on CUDA, the device-to-host synchronisations of one step, counted by
    torch.cuda's sync debug mode, which warns at each)."""
    unet, mask = build(ratio, device, tiny)
    if kind == "masked":
        optimizer, update = MaskedAdam(unet, mask, lr=1e-5), None
    else:
        optimizer = torch.optim.Adam(unet.parameters(), lr=1e-5, fused=device == "cuda")  # as erase/train.py
        update = MaskedUpdate(unet, mask).attach(optimizer)
    g = torch.Generator(device).manual_seed(2)
    for p in unet.parameters():
        p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-3
    seconds, syncs = [], None
    for i in range(steps + 1):  # the first builds the state
        sync()
        start = time.perf_counter()
        optimizer.step()
        sync()
        if i:
            seconds.append(time.perf_counter() - start)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer.step()
        torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    state = optimizer_state_bytes(optimizer)
    if update is not None:
        update.remove()
    weights = sum(p.numel() for p in unet.parameters())
    timed = {"median": round(statistics.median(seconds), 3), "min": round(min(seconds), 3), "max": round(max(seconds), 3)}
    return {"syncs_per_step": syncs, "step_seconds": timed,
            "state_bytes": state, "state_bytes_per_weight": round(state / weights, 3), "weights": weights}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def markdown(r: dict) -> str:
    lines = [f"# One optimizer step on the full-size SD 1.x UNet ({r['device']})", "",
             f"Model: {r['model']}; mask ratio {r['ratio']}; {r['steps']} timed steps after one warm-up.", "",
             "| optimizer state | step (s), median | min - max | state (GiB) | bytes per weight | host syncs per step |",
             "|---|---|---|---|---|---|"]
    for name, row in r["runs"].items():
        s = row["step_seconds"]
        syncs = "not measured (CPU)" if row["syncs_per_step"] is None else row["syncs_per_step"]
        lines.append(f"| {name} | {s['median']:.2f} | {s['min']:.2f} - {s['max']:.2f} | {row['state_bytes'] / 2**30:.2f} | "
                     f"{row['state_bytes_per_weight']:.3f} | {syncs} |")
    dense, masked = r["runs"]["dense (Adam + MaskedUpdate)"], r["runs"]["masked (MaskedAdam)"]
    lines += ["", f"MaskedAdam / dense step time: {masked['step_seconds']['median'] / dense['step_seconds']['median']:.2f}.", "",
              f"Machine: {r['machine']}. Command: `{r['command']}`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet config (a dry run of the script)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "masked_adam_step.json"))
    args = parser.parse_args()
    runs = {}
    for name, kind in [("dense (Adam + MaskedUpdate)", "dense"), ("masked (MaskedAdam)", "masked")]:
        runs[name] = time_steps(kind, args.ratio, args.steps, args.device, args.tiny)
        gc.collect()
    result = {"command": f"python bench/masked_adam_step.py --ratio {args.ratio} --steps {args.steps} --device {args.device}"
                         + (" --tiny" if args.tiny else ""),
              "machine": machine(torch.get_num_threads()) + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
              "model": "tiny UNet (a dry run)" if args.tiny else "SD 1.x UNet (CompVis/stable-diffusion-v1-4 config, random weights)",
              "device": args.device, "ratio": args.ratio, "steps": args.steps, "runs": runs}
    save_results(result, args.out, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
