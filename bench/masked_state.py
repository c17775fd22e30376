"""Adam's state for the salient weights only (`--optimizer-state masked`) against the dense default.

The same seeded SalUn erasure of "seven" from the embedded digits model twice,
`accelerate launch erase/train.py --model digits --concept seven --optimizer-state dense|masked`:
are the erased UNets bit-identical, how many bytes does each optimizer state hold (erase_config.json's
`optimizer.state_bytes`, measured on the live optimizer after training), and how long does training take.

    python bench/masked_state.py --out bench/results/masked_state.json
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

from safetensors.torch import load_file

from common import machine, save_results  # bench/common.py (the scripts run from bench/)

ROOT = Path(__file__).resolve().parents[1]


def erase(state: str, out: str, args) -> dict:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "erase" / "train.py"), "--model", "digits",
           "--concept", args.concept, "--optimizer-state", state, "--seed", str(args.seed), "--output-dir", out,
           "--cache-dir", args.cache_dir]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    record = json.loads((Path(out) / "erase_config.json").read_text())
    return {"command_seconds": time.perf_counter() - start, "train_seconds": record["seconds"]["train"],
            "state_bytes": record["optimizer"]["state_bytes"], "mask_fraction": record["mask"]["trainable_fraction"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concept", default="seven")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "erase-bench-cache"))
    parser.add_argument("--out", default="bench/results/masked_state.json")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for state in ("dense", "masked"):
            runs[state] = erase(state, os.path.join(tmp, state), args)
        a, b = (load_file(str(Path(tmp) / s / "unet" / "diffusion_pytorch_model.safetensors")) for s in ("dense", "masked"))
        identical = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    result = {"concept": args.concept, "seed": args.seed, "runs": runs, "unet_bit_identical": identical,
              "state_ratio": runs["masked"]["state_bytes"] / runs["dense"]["state_bytes"], "machine": machine()}
    d, m = runs["dense"], runs["masked"]
    markdown = "\n".join([
        "# Adam's state for the salient weights only (digits model, SalUn on seven)", "",
        f"Seed {args.seed}, mask ratio {d['mask_fraction']:.2f}; the same run with each optimizer state.", "",
        "| optimizer state | state (MiB) | train (s) | whole command (s) |", "|---|---|---|---|",
        f"| dense (default) | {d['state_bytes'] / 2**20:.2f} | {d['train_seconds']:.1f} | {d['command_seconds']:.1f} |",
        f"| masked | {m['state_bytes'] / 2**20:.2f} | {m['train_seconds']:.1f} | {m['command_seconds']:.1f} |", "",
        f"Masked / dense state: {result['state_ratio']:.3f}. Erased UNets bit-identical: {'yes' if identical else 'NO'}.", "",
        f"Machine: {result['machine']}.", ""])
    save_results(result, args.out, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
