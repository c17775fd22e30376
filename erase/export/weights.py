"""What every export reads and writes: the erased folder, the model it was erased from, the tensors
that differ, and the one safetensors file written atomically.

An erased folder is what `erase/train.py` writes: a complete diffusers pipeline plus
`erase_config.json`, whose `config.pretrained_model_name_or_path` names the original model (a
folder, a hub id or `digits`). Components are compared one pair at a time, each loaded with its own
class (so the key names are the installed libraries' own, whatever version saved the files), which
keeps at most two copies of the largest component in memory.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from erase.atomic import replace_path
from erase.command import BadInput
from erase.digits.locate import resolve_model

logger = logging.getLogger(__name__)

ERASE_CONFIG = "erase_config.json"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def erased_source(folder: str) -> str:
    """The model `folder` was erased from, as erase_config.json names it; one clear error if `folder`
    is not an erasure."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"erased folder not found: {folder}")
    if not (path / ERASE_CONFIG).is_file():
        raise ValueError(f"{folder} is not an erasure written by erase/train.py (no {ERASE_CONFIG})")
    try:
        source = json.loads((path / ERASE_CONFIG).read_text())["config"]["pretrained_model_name_or_path"]
    except (ValueError, KeyError, TypeError):
        source = None
    if not isinstance(source, str) or not source:
        raise ValueError(f"{path / ERASE_CONFIG} names no original model (config.pretrained_model_name_or_path)")
    return source


def erase_record(folder: str) -> dict:
    """erase_config.json's method and concept, for an export's metadata (empty where absent)."""
    record = json.loads((Path(folder) / ERASE_CONFIG).read_text())
    config = record.get("config") or {}
    concept = (record.get("concept") or {}).get("name") or config.get("concept")
    return {k: str(v) for k, v in {"method": config.get("method"), "concept": concept}.items() if v}


def module_components(name_or_path: str) -> dict[str, tuple[str, str]]:
    """The pipeline's torch modules by component name, from model_index.json alone:
    {"unet": ("diffusers", "UNet2DConditionModel"), "text_encoder": ("transformers", "CLIPTextModel"), ...}."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(resolve_model(name_or_path))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the pipeline {name_or_path!r}: {err}".splitlines()[0]) from err
    found = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] not in ("diffusers", "transformers"):
            continue
        cls = getattr(importlib.import_module(value[0]), value[1], None)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            found[name] = (value[0], value[1])
    return found


def check_same_components(erased: str, original: str) -> None:
    """The erased folder and the original have the same modules of the same classes."""
    mine, theirs = module_components(erased), module_components(original)
    if mine != theirs:
        differ = [f"{name} ({mine.get(name, ('', 'none'))[1]} here, {theirs.get(name, ('', 'none'))[1]} there)"
                  for name in sorted(mine.keys() | theirs.keys()) if mine.get(name) != theirs.get(name)]
        raise ValueError(f"{erased} was not erased from {original}: {', '.join(differ)}")


def load_component(name_or_path: str, component: str, library_class: tuple[str, str],
                   device: str | torch.device = "cpu") -> torch.nn.Module:
    """One component of a pipeline folder or hub id, loaded by its own class, in its stored precision."""
    cls = getattr(importlib.import_module(library_class[0]), library_class[1])
    try:
        module = cls.from_pretrained(resolve_model(name_or_path), subfolder=component)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the {component} of {name_or_path!r}: {err}".splitlines()[0]) from err
    return module.to(device).eval().requires_grad_(False)


@dataclass
class ComponentChange:
    """One component of the erased pipeline and, for each of its tensors that differs from the
    original's, the original value (same dtype and device as the erased tensor)."""

    name: str
    module: torch.nn.Module
    state: dict[str, torch.Tensor]  # the erased component's state dict
    original: dict[str, torch.Tensor]


def changed_tensors(erased: torch.nn.Module, original: torch.nn.Module, component: str = "model") -> dict[str, torch.Tensor]:
    """{name: original value} for every state-dict tensor of `erased` that is not bit-identical to the
    original's; the two must hold the same names and shapes."""
    mine, theirs = erased.state_dict(), original.state_dict()
    if mine.keys() != theirs.keys():
        missing = sorted(set(mine.keys()) ^ set(theirs.keys()))[:3]
        raise BadInput(f"the {component} does not match the original's: tensors {missing} are in one only")
    changed = {}
    for key, value in mine.items():
        before = theirs[key]
        if before.shape != value.shape:
            raise BadInput(f"the {component} does not match the original's: {key} is {tuple(value.shape)}, "
                           f"originally {tuple(before.shape)}")
        before = before.to(device=value.device, dtype=value.dtype)
        if not torch.equal(before, value):
            changed[key] = before
    return changed


def component_changes(erased: str, original: str, device: str | torch.device = "cpu",
                      first: tuple[str, ...] = ()) -> Iterator[ComponentChange]:
    """Each module component of the erased folder with what changed in it, one pair loaded at a time
    (the components named in `first` before the others)."""
    components = module_components(erased)
    for name in sorted(components, key=lambda n: n not in first):
        library_class = components[name]
        mine = load_component(erased, name, library_class, device)
        theirs = load_component(original, name, library_class, device)
        changed = changed_tensors(mine, theirs, name)
        del theirs
        state = mine.state_dict()
        logger.info("%s: %d of %d tensors changed", name, len(changed), len(state))
        yield ComponentChange(name, mine, state, changed)


def text_model_key(component: str, key: str) -> str:
    """A text encoder's tensor or module name in the spelling LoRA and checkpoint files use
    (`text_model.encoder...`): transformers >= 5.6 saves CLIPTextModel without that prefix."""
    if component in TEXT_ENCODERS and not key.startswith(("text_model.", "text_projection")):
        return "text_model." + key
    return key


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      record_size: bool = False) -> int:
    """Write `tensors` to `path` atomically (temp file, then rename); returns the file's size in bytes.
    With `record_size` the metadata also holds `file_bytes`, the size of the file it is in (serialised
    in memory until the number is stable: for the small files that record it)."""
    from safetensors.torch import save, save_file

    metadata = {"format": "pt"} | metadata  # what torch-based loaders expect of a safetensors file
    if not record_size:
        replace_path(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        return os.path.getsize(path)
    size, data = 0, b""
    while len(data) != size or not data:  # a longer number can lengthen the header: a few rounds
        size = len(data)
        data = save(tensors, metadata=metadata | {"file_bytes": str(size)})
    replace_path(path, lambda tmp: tmp.write_bytes(data))
    return size
