"""Sharded erasure on the embedded digits model: 2 FSDP processes (gloo, the CPU) against 1 process.

The same global batch both ways: 1 process with `--train-batch-size 8 --gradient-accumulation-steps 2`,
2 processes with `--train-batch-size 8 --fsdp` (each micro-batch of all processes draws from its own
stream, erase/erasure.py, so the two runs see the same images, noise and timesteps). Reported: the
mask bits that differ, the largest weight difference, each process's bytes (erase_config.json), the
whole command's time, and the erased models' scores (bench/erase_digits.py's `score`).

    python bench/sharded_digits.py --out bench/results/sharded_digits.json
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
from safetensors.torch import load_file

from erase.digits import load_digits_classifier
from erase.saliency import load_mask

from common import machine, save_results  # bench/common.py (the scripts run from bench/)
from erase_digits import ROOT, score


def launch(processes: int) -> list[str]:
    multi = ["--multi_gpu", "--main_process_port", "29571"] if processes > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *multi, str(ROOT / "erase" / "train.py")]


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"erasure failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((folder / "unet").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def markdown(r: dict) -> str:
    lines = ["# Sharded erasure (FSDP2, 2 processes over gloo) against one process, on the digits model", "",
             f"`--concept {r['concept']} --method {r['method']}`, the recipe's global batch of 16 both ways "
             f"(1 process: 8 x 2 micro-batches; 2 processes: 8 each), saliency batch {r['saliency_batch_size']}; "
             f"OMP_NUM_THREADS={r['threads']} per process.", "",
             "| run | mask bits differing | max weight difference | parameters / process (MB) | gradients / process (MB) "
             "| optimizer / process (MB) | time (s) | shown: template / paraphrases (%) | retained digits (%) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in r["runs"].items():
        b = row.get("per_process_bytes") or [row["bytes"]]
        mb = lambda key: " / ".join(f"{x[key] / 1e6:.1f}" for x in b)
        lines.append(f"| {name} | {row.get('mask_bits_differing', '–')} | {row.get('max_weight_difference', '–')} | {mb('parameters')} | "
                     f"{mb('gradients')} | {mb('optimizer')} | {row['seconds']:.1f} | {100 * row['template_rate']:.1f} / "
                     f"{100 * row['paraphrase_rate']:.1f} | {100 * row['retained_digits']:.1f} |")
    lines += ["", f"Machine: {r['machine']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concept", default="seven")
    parser.add_argument("--method", default="salun")
    parser.add_argument("--saliency-batch-size", type=int, default=16)
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "erase-bench-cache"))
    parser.add_argument("--out", default="bench/results/sharded_digits.json")
    args = parser.parse_args()
    common = ["--model", "digits", "--concept", args.concept, "--method", args.method, "--seed", "0", "--train-batch-size", "8",
              "--saliency-batch-size", str(args.saliency_batch_size), "--cache-dir", args.cache_dir]
    classifier = load_digits_classifier()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        seconds = {"1 process": run(launch(1) + common + ["--output-dir", str(one), "--gradient-accumulation-steps", "2"]),
                   "2 processes, --fsdp": run(launch(2) + common + ["--output-dir", str(two), "--fsdp"])}
        for name, folder in (("1 process", one), ("2 processes, --fsdp", two)):
            record = json.loads((folder / "erase_config.json").read_text())
            after = score(str(folder), [args.concept], args.images_per_prompt, classifier)
            digit = record["concept"]["target"].get("digit")
            others = [a for d, a in after["digit_accuracy"].items() if int(d) != digit]
            runs[name] = {"seconds": seconds[name], "template_rate": after["digit_accuracy"][str(digit)] if digit is not None else None,
                          "paraphrase_rate": after["paraphrase_rate"][args.concept], "retained_digits": sum(others) / len(others),
                          "bytes": record["sharding"]["per_process_bytes"][0] if "sharding" in record else
                          {"parameters": sum(t.numel() * 4 for t in unet_weights(folder).values()),
                           "gradients": sum(t.numel() * 4 for t in unet_weights(folder).values()),
                           "optimizer": record["optimizer"]["state_bytes"]},
                          "per_process_bytes": record.get("sharding", {}).get("per_process_bytes")}
        m1, m2 = load_mask(one / "saliency_mask.safetensors"), load_mask(two / "saliency_mask.safetensors")
        w1, w2 = unet_weights(one), unet_weights(two)
        runs["2 processes, --fsdp"]["mask_bits_differing"] = sum(int((m1[k] != m2[k]).sum()) for k in m1)
        runs["2 processes, --fsdp"]["max_weight_difference"] = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    result = {"concept": args.concept, "method": args.method, "saliency_batch_size": args.saliency_batch_size,
              "threads": os.environ.get("OMP_NUM_THREADS", "1"), "runs": runs, "machine": machine()}
    text = markdown(result)
    save_results(result, args.out, text)
    print(text)


if __name__ == "__main__":
    main()
