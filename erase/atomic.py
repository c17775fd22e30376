"""Writes that never leave half an output behind: write beside the target, then rename into place.

A run killed mid-write leaves the previous target (or none) and a hidden `.NAME.partial-PID`
sibling, which the next write of the same target clears. Used for every JSON report, the
saved digits pipeline and eval's report folders.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def replace_path(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` creates a file or a folder at a sibling temporary path, which then replaces
    `target` (a folder target is removed first: a folder cannot be renamed over a folder)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    _remove(tmp)
    try:
        write(tmp)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        _remove(tmp)
    return target


def replace_dir(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(folder)` fills an empty temporary folder, which then replaces the folder `target`."""

    def make_and_write(tmp: Path) -> None:
        tmp.mkdir()
        write(tmp)

    return replace_path(target, make_and_write)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Indented JSON (numpy scalars, tensors and paths converted), written atomically."""
    replace_path(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n"))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
