"""What the benchmark scripts share: where and how results are written, and the machine line."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from erase.atomic import write_json


def machine(threads: int | None = None) -> str:
    cores = f"{threads} thread(s)" if threads else f"{os.cpu_count()} cores"
    return f"{platform.machine()}, {cores}, torch {torch.__version__}"


def save_results(result: dict, out: str | os.PathLike, markdown: str) -> None:
    """The JSON at `out` (atomically) and its Markdown table beside it, as .md."""
    write_json(result, str(out))
    Path(out).with_suffix(".md").write_text(markdown)
