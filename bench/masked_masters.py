"""Masked master weights on digits-flow, measured on live runs against the arithmetic.

Three seeded SalUn erasures of one concept from the embedded transformer (the concept file's recipe):
`--optimizer-state masked` (fp32 weights, moments of the mask's entries), `--master-weights masked`
in fp32 (the same, plus fp32 masters of those entries) and `--master-weights masked --mixed-precision
bf16` (bf16 weights, fp32 masters and moments of the mask's entries). Reported: the masks' agreement,
the largest weight difference between the two fp32 runs, and each run's optimizer state bytes (read
by erase/train.py from the live optimizer) against 8 (moments) or 12 (masters + moments) bytes a salient
weight plus the mask's bits and step counters; the whole command's time.

    python bench/masked_masters.py --out bench/results/masked_masters.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from erase.saliency import load_mask

from common import machine, save_results  # bench/common.py (the scripts run from bench/)
from erase_digits import erase_command

RUNS = {"masked state, fp32": ("--optimizer-state", "masked"), "masked masters, fp32": ("--master-weights", "masked"),
        "masked masters, bf16": ("--master-weights", "masked", "--mixed-precision", "bf16")}


def transformer(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))


def markdown(result: dict) -> str:
    lines = [f"# Masked master weights on `{result['model']}` (SalUn, {result['concept']}, seed 0)", "",
             f"Salient weights: {result['salient']:,} of {result['weights']:,}; the fp32 runs' masks agree: {result['masks_agree']}; "
             f"largest weight difference between the fp32 runs: {result['max_abs_difference_fp32']:.1e}.", "",
             "| run | weights dtype | optimizer state (bytes) | computed (bytes) | bytes per salient weight | time (s) |",
             "|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        lines.append(f"| {name} | {r['dtype']} | {r['state_bytes']:,} | {r['computed_bytes']:,} | "
                     f"{r['state_bytes'] / result['salient']:.2f} | {r['seconds']:.1f} |")
    lines += ["", "Computed: 8 bytes (two fp32 moments) or 12 (master + moments) a salient weight, 1 bit a weight of every "
                  "tensor with a salient entry, and a 4-byte step counter a tensor.",
              f"Machine: {result['machine']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-flow", choices=["digits", "digits-flow"])
    parser.add_argument("--concept", default="seven")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "erase-bench-cache"))
    parser.add_argument("--out", default="bench/results/masked_masters.json")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in RUNS.items():
            out = os.path.join(tmp, name.replace(" ", "").replace(",", "-"))
            start = time.perf_counter()
            proc = subprocess.run(erase_command(args.concept, "salun", 0, out, args.cache_dir, *flags, model=args.model),
                                  capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
            record = json.loads(Path(out, "erase_config.json").read_text())
            runs[name] = {"seconds": time.perf_counter() - start, "state_bytes": record["optimizer"]["state_bytes"],
                          "weights": transformer(out), "mask": load_mask(os.path.join(out, "saliency_mask.safetensors"))}
    mask = runs["masked state, fp32"]["mask"]
    salient = sum(int(m.sum()) for m in mask.values())
    moving = [m for m in mask.values() if m.any()]
    overhead = sum((m.numel() + 7) // 8 + 4 for m in moving)
    a, b = runs["masked state, fp32"]["weights"], runs["masked masters, fp32"]["weights"]
    result = {
        "model": args.model, "concept": args.concept, "salient": salient, "weights": sum(m.numel() for m in mask.values()),
        "masks_agree": all(torch.equal(mask[n], runs["masked masters, fp32"]["mask"][n]) for n in mask),
        "max_abs_difference_fp32": max(float((a[k] - b[k]).abs().max()) for k in a),
        "runs": {name: {"dtype": str(next(iter(r["weights"].values())).dtype).replace("torch.", ""), "state_bytes": r["state_bytes"],
                        "computed_bytes": (8 if name.startswith("masked state") else 12) * salient + overhead,
                        "seconds": round(r["seconds"], 1)} for name, r in runs.items()},
        "command": f"python bench/masked_masters.py --model {args.model} --concept {args.concept}", "machine": machine(),
    }
    save_results(result, args.out, markdown(result))
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
