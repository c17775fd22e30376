"""The erasure as a delta: only the tensors that changed, to write over the original pipeline.

One safetensors file. A tensor stored whole is keyed `<component>.<name>` and holds the erased
value. A tensor of which few entries moved (SalUn changes only its masked weights) is stored as
`<component>.<name>.indices` (positions in the flattened tensor, int32 where they fit) and
`<component>.<name>.values` (the erased values there), whichever of the two is smaller. Values,
not differences, are stored, so applying a delta reproduces the erased weights bit for bit.
Text encoder names carry transformers' `text_model.` prefix whatever version wrote them.
"""

from __future__ import annotations

import os

import torch

from erase.command import BadInput
from erase.export.weights import TEXT_ENCODERS, ComponentChange, component_changes, text_model_key, write_safetensors

DELTA_FORMAT = "erase-delta/1"


def delta_entries(component: str, key: str, erased: torch.Tensor, original: torch.Tensor) -> dict[str, torch.Tensor]:
    """One changed tensor, dense or as (indices, values), whichever takes fewer bytes."""
    name = f"{component}.{text_model_key(component, key)}"
    moved = (erased != original).flatten()
    count = int(moved.sum())
    index_dtype = torch.int32 if erased.numel() < 2**31 else torch.int64
    sparse_bytes = count * (index_dtype.itemsize + erased.element_size())
    if sparse_bytes >= erased.numel() * erased.element_size():
        return {name: erased.detach().cpu().contiguous()}
    positions = moved.nonzero().squeeze(1)
    return {f"{name}.indices": positions.to(index_dtype).cpu(), f"{name}.values": erased.flatten()[positions].detach().cpu()}


def delta_tensors(changes: list[ComponentChange]) -> dict[str, torch.Tensor]:
    """Every changed tensor of every component, each in its smaller form."""
    tensors = {}
    for change in changes:
        for key, original in sorted(change.original.items()):
            tensors |= delta_entries(change.name, key, change.state[key], original)
    return tensors


def _target(state: dict[str, torch.Tensor], component: str, name: str) -> torch.Tensor:
    candidates = [name, name.removeprefix("text_model.")] if component in TEXT_ENCODERS else [name]
    for candidate in candidates:
        if candidate in state:
            return state[candidate]
    raise ValueError(f"the delta changes {component}.{name}, which this pipeline does not have")


@torch.no_grad()
def apply_delta(pipe, path: str | os.PathLike) -> list[str]:
    """Write the erased weights of a delta file over `pipe` (the ORIGINAL pipeline, on any device and
    in any precision) in place; returns the names of the tensors it changed."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("export") != DELTA_FORMAT:
        raise ValueError(f"{path} is not an erasure delta (metadata export {metadata.get('export')!r}, expected {DELTA_FORMAT})")
    tensors, states, changed = load_file(str(path)), {}, []
    for key, value in tensors.items():
        if key.endswith(".indices"):
            continue
        name = key.removesuffix(".values")
        component, _, tensor_name = name.partition(".")
        if component not in states:
            states[component] = getattr(pipe, component).state_dict()
        target = _target(states[component], component, tensor_name)
        if key.endswith(".values"):
            positions = tensors[f"{name}.indices"].to(device=target.device, dtype=torch.long)
            target.view(-1)[positions] = value.to(device=target.device, dtype=target.dtype)
        elif target.shape != value.shape:
            raise ValueError(f"the delta's {name} is {tuple(value.shape)}, the pipeline's {tuple(target.shape)}")
        else:
            target.copy_(value)
        changed.append(name)
    return changed


def export_delta(erased: str, original: str, out: str, device: str | torch.device = "cpu",
                 metadata: dict[str, str] | None = None) -> dict:
    """Write the delta file; returns how many tensors it holds, in which form, and its size."""
    tensors, changed = {}, []
    for change in component_changes(erased, original, device):
        tensors |= delta_tensors([change])
        changed += [f"{change.name}.{key}" for key in change.original]
    if not changed:
        raise BadInput(f"{erased} equals {original}: nothing changed, nothing to export")
    sparse = sum(key.endswith(".values") for key in tensors)
    info = {"export": DELTA_FORMAT, "tensors": str(len(changed)), "sparse_tensors": str(sparse),
            "apply": "erase.export.apply_delta(pipe, FILE), or see the README's few lines of safetensors + torch"}
    size = write_safetensors(out, tensors, (metadata or {}) | info)
    return {"format": "delta", "tensors": len(changed), "dense_tensors": len(changed) - sparse, "sparse_tensors": sparse,
            "entries_stored": sum(v.numel() for k, v in tensors.items() if not k.endswith(".indices")), "file_bytes": size}
