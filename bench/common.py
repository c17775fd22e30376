"""What the benchmark scripts share: where and how results are written, the machine line, and the
unlearning metrics' summaries (gap to Retrain, mean and standard deviation over seeds)."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import torch

from erase.atomic import write_json


METRICS = ("UA", "RA", "TA", "MIA")  # erase.classifier.evaluate's


def gap(metrics: dict[str, float], retrain: dict[str, float]) -> float:
    """Mean |metric - Retrain's| over UA, RA, TA and MIA-efficacy (SalUn's "gap")."""
    return sum(abs(metrics[k] - retrain[k]) for k in METRICS) / len(METRICS)


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def mean_std_text(values: list[float]) -> str:
    """`mean ± std` with one decimal."""
    summary = mean_std(values)
    return f"{summary['mean']:.1f} ± {summary['std']:.1f}"


def machine(threads: int | None = None) -> str:
    cores = f"{threads} thread(s)" if threads else f"{os.cpu_count()} cores"
    return f"{platform.machine()}, {cores}, torch {torch.__version__}"


def save_results(result: dict, out: str | os.PathLike, markdown: str) -> None:
    """The JSON at `out` (atomically) and its Markdown table beside it, as .md."""
    write_json(result, str(out))
    Path(out).with_suffix(".md").write_text(markdown)
