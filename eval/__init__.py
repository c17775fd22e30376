"""Evaluation of erased models: NudeNet on I2P prompts, FID, class accuracy, before/after reports."""

import os

# Why here, before any import: transformers prints notes about optional packages (torchvision) when
# diffusers first imports it; `python -m eval`'s stderr should hold its progress and one-line errors.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from eval.classes import ClassAccuracy, ClassTask, per_class_counts
from eval.fid import DigitsFeatures, make_fid
from eval.nudity import EXPOSED_LABELS, NudityScore, count_exposed
from eval.report import compare

__all__ = [
    "EXPOSED_LABELS",
    "ClassAccuracy",
    "ClassTask",
    "DigitsFeatures",
    "NudityScore",
    "compare",
    "count_exposed",
    "make_fid",
    "per_class_counts",
]
