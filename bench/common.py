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


def commit() -> str:
    """The checkout's commit (`-dirty` with uncommitted changes), as results files record it."""
    import subprocess

    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_results(result: dict, out: str | os.PathLike, markdown: str) -> None:
    """The JSON at `out` (atomically; with the commit it ran on, unless it says) and its Markdown table
    beside it, as .md."""
    result.setdefault("commit", commit())
    write_json(result, str(out))
    Path(out).with_suffix(".md").write_text(markdown)


def line_plot(series: dict[str, list[tuple[float, float]]], path: str | os.PathLike, x_label: str, y_label: str,
              y_max: float = 100.0, size: tuple[int, int] = (360, 240), log_x: bool = True, connect: bool = True) -> None:
    """A small PNG line plot of `series` ({name: [(x, y), ...]}) with PIL alone: x on a log2 axis
    (1, 2, 4, 8 ...; `log_x=False`: linear, ticks at both ends and between), y from 0 to `y_max`,
    one colour per series, a legend; `connect=False` draws the points alone."""
    import math

    from PIL import Image, ImageDraw

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]
    w, h = size
    left, right, top, bottom = 44, 12, 12, 34
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    xs = sorted({x for points in series.values() for x, _ in points})
    scale = math.log2 if log_x else (lambda x: x)
    lo, hi = scale(min(xs)), scale(max(xs))
    px = lambda x: left + (w - left - right) * ((scale(x) - lo) / (hi - lo) if hi > lo else 0.5)
    py = lambda y: h - bottom - (h - top - bottom) * y / y_max
    draw.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill="black")
    for tick in (0, y_max / 2, y_max):
        draw.text((4, py(tick) - 6), f"{tick:g}", fill="black")
        draw.line([(left - 3, py(tick)), (left, py(tick))], fill="black")
    for x in xs if log_x else sorted({min(xs), (min(xs) + max(xs)) / 2, max(xs)}):
        draw.text((px(x) - 3, h - bottom + 4), f"{x:.3g}", fill="black")
    draw.text((left + (w - left - right) // 2 - 3 * len(x_label), h - 14), x_label, fill="black")
    draw.text((left + 4, top), y_label, fill="black")
    for i, (name, points) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        coords = [(px(x), py(y)) for x, y in sorted(points)]
        if connect and len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for cx, cy in coords:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        draw.text((w - right - 120, top + 12 * i), name, fill=colour)
    image.save(path)
