from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from erase.atomic import replace_dir, replace_path, write_json


def test_write_json_converts_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "r.json"
    write_json({"a": np.float32(0.5), "b": torch.tensor([1, 2]), "c": Path("x/y")}, path)
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [1, 2], "c": "x/y"}
    write_json([1], path)
    assert json.loads(path.read_text()) == [1]
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_write_json_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json({"old": True}, path)
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_json({"bad": object()}, path)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_replace_dir_swaps_a_folder_or_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "out"
    replace_dir(target, lambda d: (d / "a.txt").write_text("1"))
    replace_dir(target, lambda d: (d / "b.txt").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]

    def fail(d: Path) -> None:
        (d / "c.txt").write_text("3")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        replace_dir(target, fail)
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial folder left


def test_published_files_get_ordinary_permissions(tmp_path: Path) -> None:
    """A writer that creates its file with mkstemp (mode 0600, as safetensors does) still publishes
    a file with the permissions of any other: 0666 less the umask."""
    import os
    import stat
    import tempfile

    def write(tmp: Path) -> None:
        fd, name = tempfile.mkstemp(dir=tmp.parent)
        os.write(fd, b"x")
        os.close(fd)
        os.replace(name, tmp)

    umask = os.umask(0o022)
    try:
        target = replace_path(tmp_path / "mask.safetensors", write)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
