"""bench/memory.py: the flow transformers' configs build on the meta device to their parameter counts,
the masked-masters bytes follow their formula, and the committed results hold the flow models' rows."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def memory():
    sys.path.insert(0, str(ROOT / "bench"))  # its `from common import ...`
    try:
        spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclass looks itself up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def test_flow_configs_build_to_their_parameter_counts(memory) -> None:
    counts = {key: memory.count(memory.build(memory.MODELS[key])) for key in ("sd35m", "sd35l", "flux")}
    assert counts == {"sd35m": 2_243_171_520, "sd35l": 8_056_627_520, "flux": 11_901_408_320}


@pytest.mark.parametrize("processes", [1, 8])
def test_masked_masters_bytes_follow_the_formula(memory, processes: int) -> None:
    p, largest, act = 1_000_000, 10_000, {"plain": 7_000, "checkpointed": 3_000}
    sizes = {"denoiser_parameters": p, "denoiser_buffers": 100, "largest_unit_parameters": largest, "frozen_parameters": 5,
             "activations_per_image": act}
    b = memory.per_process(sizes, processes, "masked", "masked", True, 1, 0.1)
    n = processes
    want = {"weights": 2 * p / n, "gradients": 2 * p / n, "optimizer": 12 * 0.1 * p / n, "mask_bits": p / 8 / n, "buffers": 200,
            "autocast_copy": 0.0, "gathered_units": 3 * largest * 2 if n > 1 else 0.0, "activations": 2 * 3_000}
    assert {k: b[k] for k in want} == pytest.approx(want)
    assert b["total"] == pytest.approx(sum(want.values()))
    # the fp32 and bf16 masters keep their formulas
    fp32 = memory.per_process(sizes, n, "fp32", "dense", False, 1, 0.5)
    assert (fp32["weights"], fp32["optimizer"], fp32["autocast_copy"]) == (4 * p / n, 8 * p / n, 2 * p if n == 1 else 0.0)
    bf16 = memory.per_process(sizes, n, "bf16", "masked", False, 1, 0.5)
    assert bf16["optimizer"] == pytest.approx(2 * 0.5 * p * 2 / n + p / 8 / n)
    with pytest.raises(ValueError):
        memory.per_process(sizes, n, "masked", "dense", True, 1, 0.1)


def test_results_hold_the_flow_rows() -> None:
    result = json.loads((ROOT / "bench" / "results" / "memory.json").read_text())
    assert set(result["flow_models"]) == {"sd35m", "sd35l", "flux"}
    for key in result["flow_models"]:
        rows = [r for r in result["rows"] if r["model"] == key]
        assert {r["ratio"] for r in rows if r["masters"] == "masked"} == {0.5, 0.1, 0.01}
        assert {r["processes"] for r in rows} == {1, 2, 4, 8} and {r["checkpointing"] for r in rows} == {True, False}
    flux = result["models"]["flux"]
    row = next(r for r in result["rows"] if (r["model"], r["processes"], r["masters"], r["ratio"], r["checkpointing"])
               == ("flux", 8, "masked", 0.1, True))
    p = flux["denoiser_parameters"]
    assert row["bytes"]["weights"] == row["bytes"]["gradients"] == 2 * p / 8
    assert row["bytes"]["optimizer"] == pytest.approx(12 * 0.1 * p / 8) and row["bytes"]["mask_bits"] == pytest.approx(p / 8 / 8)
    assert row["bytes"]["activations"] == 2 * flux["activations_per_image"]["checkpointed"]
