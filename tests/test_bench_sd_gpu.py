"""bench/sd_gpu.py --tiny: the GPU benchmark's whole path (build, accelerate launch erase/train.py,
reload in a fresh process, bit-identity checks, JSON + Markdown) on a tiny config on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "sd_tiny.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run([sys.executable, "bench/sd_gpu.py", "--tiny", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["reload"] == {"loads": True, "text_encoder_identical": True, "vae_identical": True, "unet_dtype": "torch.float32",
                           "masked_out_unet_identical": True, "salient_weights_moved": r["reload"]["salient_weights_moved"]}
    assert r["reload"]["salient_weights_moved"] > 0.5
    assert set(r["seconds"]) >= {"data", "mask", "train", "save"} and all(v > 0 for v in r["seconds"].values())
    assert r["settings"]["mixed_precision"] == "bf16" and r["flops_per_step"] > 0 and not r["paper_recipe"]
    assert r["full_recipe_seconds_projected_from_measured_rates"] > 0
    assert "projected from measured rates" in out.with_suffix(".md").read_text()
