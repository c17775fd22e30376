"""Saliency masks on disk and in memory: bit-packing (1 bit a weight), the safetensors mask file
(atomic writes, one clear error for a damaged or foreign file), and checks against a model."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from erase.atomic import replace_path
from erase.command import BadInput
from erase.sharding import local, sum_over_processes

__all__ = ["MASK_FORMAT", "check_mask_matches", "load_mask", "mask_fraction", "pack_bits", "read_mask_shapes", "save_mask",
           "unpack_bits"]

MASK_FORMAT = "erase-saliency-mask/1"


def mask_fraction(mask: Mapping[str, torch.Tensor], sharded: bool = False) -> float:
    """The fraction of weights the mask keeps (`sharded`: over every process's rows)."""
    counts = torch.tensor([sum(int(m.sum()) for m in mask.values()), sum(m.numel() for m in mask.values())], dtype=torch.int64)
    kept, total = sum_over_processes(counts, sharded).tolist()
    return kept / max(1, total)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries a byte, first entry in the high bit (numpy.packbits'
    order), on the mask's device."""
    flat = mask.reshape(-1).to(torch.uint8)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `pack_bits`: a bool tensor of `shape` on the device of `packed`."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[: int(np.prod(shape, dtype=np.int64))].view(tuple(shape)).bool()


def save_mask(mask: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
    """Write the mask bit-packed (1 bit per weight) to a safetensors file, atomically."""
    tensors, shapes = {}, {}
    for name, m in mask.items():
        tensors[name] = pack_bits(m.detach().bool()).cpu()
        shapes[name] = list(m.shape)
    meta = {"format": MASK_FORMAT, "shapes": json.dumps(shapes), "ratio": repr(mask_fraction(mask))}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    replace_path(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_mask_shapes(path: str | os.PathLike, shard: bool = False) -> dict[str, list[int]]:
    """The names and shapes a mask file holds, from its header alone; one clear error for a missing,
    corrupt or foreign file, and for one process's rows of a sharded run's mask (unless `shard`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for a damaged file
        raise BadInput(f"{path} is not a readable safetensors file ({err})".splitlines()[0]) from None
    if meta.get("format") != MASK_FORMAT:
        raise BadInput(f"{path} is not a saliency mask written by this toolkit")
    if "sharding" in meta and not shard:
        raise BadInput(f"{path} holds one process's rows of a sharded run's mask: pass the run's saliency_mask.safetensors")
    return json.loads(meta["shapes"])


def load_mask(path: str | os.PathLike, model: torch.nn.Module | None = None, shard: bool = False) -> dict[str, torch.Tensor]:
    """Read a mask written by `save_mask`; with `model`, check every name and shape against it
    (`shard`: this process's rows of a sharded run's mask, against its rows of the model)."""
    path = os.fspath(path)
    shapes = read_mask_shapes(path, shard)
    try:
        with safe_open(path, framework="pt") as f:
            mask = {name: unpack_bits(f.get_tensor(name), shape) for name, shape in shapes.items()}
    except Exception as err:
        raise BadInput(f"{path}: the mask's data is damaged ({err})".splitlines()[0]) from None
    if model is not None:
        check_mask_matches(mask, model, source=path, whole=not shard)
    return mask


def check_mask_matches(mask: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str = "mask", whole: bool = False) -> None:
    """Every name of `mask` is a parameter of `model` of the mask's shape: the whole parameter's
    (`whole`), or this process's rows of a sharded parameter."""
    params = dict(model.named_parameters())
    missing = [n for n in mask if n not in params]
    if missing:
        raise BadInput(f"{source} does not fit this model: {len(missing)} names not in the model, e.g. {missing[0]!r}")
    for name, m in mask.items():
        shape = tuple(params[name].shape if whole else local(params[name]).shape)
        if tuple(m.shape) != shape:
            raise BadInput(
                f"{source} does not fit this model: {name!r} has shape {tuple(m.shape)} in the mask "
                f"and {shape} in the model"
            )
