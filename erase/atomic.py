"""Writes that never leave half an output behind: write beside the target, then rename into place.

A run killed mid-write leaves the previous target (or none) and a hidden `.NAME.partial-PID`
sibling, which the next write of the same target clears. Every output of the toolkit goes
through here: JSON reports, saved pipelines, masks, image caches, checkpoints, report folders.
Written files get the ordinary permissions (0666 less the umask), whatever wrote them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
        if tmp.is_file():
            os.chmod(tmp, 0o666 & ~_umask())  # writers using mkstemp leave 0600
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


@contextmanager
def shared_output_dir(target: str | os.PathLike | None, state=None) -> Iterator[Path | None]:
    """A temporary folder that every process may write into, swapped in place of `target` by the
    main process when the block succeeds and removed when it fails. `state` is an Accelerate
    `PartialState` or `Accelerator` (None: one process)."""
    if target is None:
        yield None
        return
    target = Path(target)
    tmp = target.with_name(f".{target.name}.partial")  # the same name in every process
    main = state is None or state.is_main_process
    if main:
        _remove(tmp)
        tmp.mkdir(parents=True)
    if state is not None:
        state.wait_for_everyone()
    try:
        yield tmp
        if state is not None:
            state.wait_for_everyone()
        if main:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(tmp, target)
    finally:
        if main:
            _remove(tmp)
        if state is not None:
            state.wait_for_everyone()


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
