"""Concept specs: what to forget (prompts c), what to map it to (anchor c'), what to keep.

A concept file in prompts/*.yaml holds several concepts:

    concepts:
      seven:
        forget: ["a red handwritten digit seven", ...]   # c, the prompts that name the concept
        anchor: ["a red handwritten digit eight", ...]   # c', one per forget prompt (or one for all)
        retain: [...]    # optional; default: the other concepts' forget prompts in the file
        eval: [...]      # optional held-out wordings (paraphrases) to test the erasure
        target: {digit: 7}   # optional, what an evaluator should look for
    train: {learning_rate: 1e-4, ...}   # optional recipe for this file's model (file or concept level)
    model: digits   # optional: the kind of model the file is for (default: stable-diffusion)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from erase.defaults import SD_KIND

__all__ = ["Concept", "available_concepts", "concept_file_model", "load_concept", "merge_concepts"]


def _prompts_dir() -> Path:
    """The concept files: erase/prompts/ in an installed wheel, the checkout's prompts/ otherwise."""
    here = Path(__file__).resolve().parent
    installed = here / "prompts"
    return installed if installed.is_dir() else here.parent / "prompts"


PROMPTS_DIR = _prompts_dir()


@dataclass
class Concept:
    name: str
    forget: list[str]
    anchor: list[str]
    retain: list[str]
    eval: list[str] = field(default_factory=list)
    target: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # training recipe tuned for this file's model
    source: str = ""

    def __post_init__(self) -> None:
        if not self.forget:
            raise ValueError(f"concept {self.name!r} has no forget prompt")
        if len(self.anchor) == 1:
            self.anchor = self.anchor * len(self.forget)
        if len(self.anchor) != len(self.forget):
            raise ValueError(f"concept {self.name!r}: give one anchor prompt, or one per forget prompt")
        if not self.retain:
            raise ValueError(f"concept {self.name!r} has no retain prompt")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _read_file(path: Path) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data.get("concepts"), dict):
        raise ValueError(f"{path} has no `concepts:` mapping")
    return data


def _read(path: Path) -> dict[str, dict]:
    return _read_file(path)["concepts"]


def available_concepts(prompts_dir: str | Path = PROMPTS_DIR) -> dict[str, Path]:
    """{concept name: file} over every prompts/*.yaml."""
    found: dict[str, Path] = {}
    for path in sorted(Path(prompts_dir).glob("*.yaml")):
        for name in _read(path):
            found.setdefault(str(name), path)
    return found


def concept_file_model(path: str | Path) -> str:
    """The kind of model a concept file is written for: its `model:` key (erase.sd.model_kind's
    names), Stable Diffusion when it has none."""
    return str(_read_file(Path(path)).get("model") or SD_KIND)


def load_concept(name: str, prompts_dir: str | Path = PROMPTS_DIR) -> Concept:
    """The concept called `name` in prompts/*.yaml; retain defaults to the file's other concepts."""
    known = available_concepts(prompts_dir)
    if name not in known:
        raise ValueError(f"unknown concept {name!r}; known: {', '.join(sorted(known))} (or pass --forget-prompt)")
    path = known[name]
    data = _read_file(path)
    concepts = data["concepts"]
    spec = concepts[name]
    forget = _as_list(spec.get("forget"))
    retain = _as_list(spec.get("retain"))
    if not retain:  # every other concept's prompts, except wordings shared with this one
        others = [p for other, s in concepts.items() if other != name for p in _as_list(s.get("forget"))]
        retain = [p for p in dict.fromkeys(others) if p not in forget]
    return Concept(
        name=name,
        forget=forget,
        anchor=_as_list(spec.get("anchor")),
        retain=retain,
        eval=_as_list(spec.get("eval")),
        target=dict(spec.get("target") or {}),
        train={**(data.get("train") or {}), **(spec.get("train") or {})},
        source=str(path),
    )


def custom_concept(forget: list[str], anchor: list[str], retain: list[str], name: str = "custom") -> Concept:
    """A concept from command-line prompts (`--forget-prompt`, `--anchor-prompt`, `--retain-prompt`)."""
    return Concept(name=name, forget=forget, anchor=anchor or [""], retain=retain or anchor)


def merge_concepts(concepts: list[Concept]) -> Concept:
    """Several concepts erased in one run: every forget/anchor pair, and the retain prompts of all
    of them except any prompt that one of them forgets. One concept is returned as it is."""
    if len(concepts) == 1:
        return concepts[0]
    names = [c.name for c in concepts]
    if len(set(names)) < len(names):
        raise ValueError(f"concept given twice: {', '.join(names)}")
    sources = {c.source for c in concepts}
    if len(sources) > 1:
        raise ValueError(f"concepts {', '.join(names)} come from different concept files ({', '.join(sorted(sources))}): "
                         "erase concepts of one model together")
    forget = [p for c in concepts for p in c.forget]
    retain = [p for p in dict.fromkeys(p for c in concepts for p in c.retain) if p not in set(forget)]
    if not retain:
        raise ValueError(f"concepts {', '.join(names)} leave no retain prompt (every one is forgotten)")
    return Concept(name="+".join(names), forget=forget, anchor=[p for c in concepts for p in c.anchor], retain=retain,
                   eval=[p for c in concepts for p in c.eval], train=dict(concepts[0].train), source=concepts[0].source)
