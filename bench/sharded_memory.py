"""Host memory per process of a sharded erasure on the full-size SD 1.x architecture (CPU, gloo).

A pipeline of CompVis/stable-diffusion-v1-4's architecture with random weights (bench/sd_gpu.py's
builder; nothing is downloaded) is erased three ways with the same short SalUn run
(`accelerate launch erase/train.py --concept nudity`, 64 px, 2 + 2 images, 2 steps):
  - one process, unsharded;
  - 2 processes `--fsdp`, the UNet read row by row from its safetensors file (no process holds it whole);
  - 2 processes `--fsdp` on the same model with its UNet saved as a pickle (.bin): each process then
    loads the whole UNet before sharding it (the only way left for such weights).
Reported: each process's peak resident host memory (erase_config.json, getrusage), the UNet's bytes
per process, and the seconds of each command.

    python bench/sharded_memory.py --out bench/results/sharded_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import machine, save_results  # bench/common.py (the scripts run from bench/)
from sd_gpu import build_pipeline

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--concept", "nudity", "--resolution", "64", "--num-images", "2", "--generation-steps", "2", "--generation-batch-size", "2",
       "--train-batch-size", "1", "--saliency-batch-size", "1", "--max-train-steps", "2"]


def pickled_copy(model: Path, out: Path) -> None:
    """`model` with its UNet weights as diffusion_pytorch_model.bin (the other parts linked)."""
    out.mkdir()
    for part in model.iterdir():
        if part.name != "unet":
            os.symlink(part, out / part.name)
    (out / "unet").mkdir()
    shutil.copy(model / "unet" / "config.json", out / "unet" / "config.json")
    from safetensors.torch import load_file

    torch.save(load_file(model / "unet" / "diffusion_pytorch_model.safetensors"), out / "unet" / "diffusion_pytorch_model.bin")


def erase(model: Path, out: Path, cache: Path, processes: int, unet_bytes: int) -> dict:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29571"]
    if processes > 1:
        launch += ["--multi_gpu"]
    cmd = [*launch, str(ROOT / "erase" / "train.py"), "--model", str(model), *RUN, "--output-dir", str(out), "--cache-dir", str(cache),
           *(["--fsdp"] if processes > 1 else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"erase/train.py failed:\n{proc.stderr[-3000:]}")
    record = json.loads((out / "erase_config.json").read_text())
    gib = lambda b: round(b / 2**30, 2)
    if processes == 1:
        peaks = record["peak_host_memory_gib"]
        return {"processes": 1, "seconds": round(seconds, 1), "host_peak_load_gib": [round(peaks["load"], 2)],
                "host_peak_gib": [round(peaks["run"], 2)], "unet_gib_per_process": gib(unet_bytes), "loaded": "whole (one process)"}
    sharding = record["sharding"]
    return {"processes": processes, "seconds": round(seconds, 1),
            "host_peak_load_gib": [gib(p["host_peak_load"]) for p in sharding["per_process_bytes"]],
            "host_peak_gib": [gib(p["host_peak"]) for p in sharding["per_process_bytes"]],
            "unet_gib_per_process": gib(sharding["per_process_bytes"][0]["parameters"]), "loaded": sharding["loaded"]}


def markdown(r: dict) -> str:
    lines = ["# Host memory per process of a sharded erasure (SD 1.x architecture, CPU)", "",
             f"Model: {r['model']}; the run: `{' '.join(r['run'])}`.", "",
             "| run | processes | UNet loaded | UNet per process (GiB) | peak host memory per process while loading (GiB) | "
             "peak host memory per process, whole run (GiB) | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name, row in r["runs"].items():
        load, run = (" / ".join(f"{p:.2f}" for p in row[k]) for k in ("host_peak_load_gib", "host_peak_gib"))
        lines.append(f"| {name} | {row['processes']} | {row['loaded']} | {row['unet_gib_per_process']:.2f} | {load} | {run} | "
                     f"{row['seconds']:.1f} |")
    lines += ["", "Loading: each process's peak resident memory (getrusage) up to the end of loading the pipeline; whole "
              "run: up to the end of training, before saving (weights, gradients and Adam's two moments are 4x the trained "
              "weights' bytes, 1/N per process: from 4 processes on no more than one whole fp32 copy). One process's "
              "loading peak is low because diffusers maps the safetensors file and pages come in as they are touched.",
              "", f"Machine: {r['machine']}. Command: `{r['command']}`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sharded_memory.json"))
    parser.add_argument("--work", help="folder for the model and the runs (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        sizes = build_pipeline(tmp / "model", tiny=False)
        pickled_copy(tmp / "model", tmp / "model-bin")
        runs = {}
        for name, model, processes in [("one process", tmp / "model", 1), ("--fsdp, 2 processes (safetensors)", tmp / "model", 2),
                                       ("--fsdp, 2 processes (.bin weights)", tmp / "model-bin", 2)]:
            folder = tmp / f"run{len(runs)}"
            folder.mkdir()
            runs[name] = erase(model, folder / "out", folder / "cache", processes, unet_bytes=int(sizes["unet"] * 1e6) * 4)
            shutil.rmtree(folder)
    result = {"command": "python bench/sharded_memory.py", "machine": machine(), "model":
              f"CompVis/stable-diffusion-v1-4 architecture, random weights (UNet {sizes['unet']:.0f}M, "
              f"text encoder {sizes['text_encoder']:.0f}M, VAE {sizes['vae']:.0f}M parameters)",
              "run": RUN, "runs": runs}
    save_results(result, args.out, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
