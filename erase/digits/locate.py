"""`--model digits`: recognising the embedded model (and models erased from it), its sampler
defaults, and resolving it to a folder (trained into the cache on first use if missing)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from erase.defaults import DIGITS_GUIDANCE, DIGITS_MODEL_NAME, DIGITS_STEPS
from erase.digits import paths
from erase.digits.paths import cache_dir

logger = logging.getLogger("erase.digits")

MODEL_NAME = DIGITS_MODEL_NAME
DEFAULT_STEPS, DEFAULT_GUIDANCE = DIGITS_STEPS, DIGITS_GUIDANCE


def is_digits_model(name_or_path: str, _depth: int = 0) -> bool:
    """The embedded model, or a folder erased from it (erase/train.py's erase_config.json says so)."""
    if name_or_path == MODEL_NAME:
        return True
    folder = Path(name_or_path)
    if (folder / "digits_training.json").is_file():
        return True
    try:
        record = json.loads((folder / "erase_config.json").read_text())
        source = record["config"]["pretrained_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(source, str) and _depth < 8 and is_digits_model(source, _depth + 1)


def resolve_model(name_or_path: str) -> str:
    """Map "digits" to the embedded pipeline's folder (trained on first use if missing); pass others through."""
    if name_or_path != MODEL_NAME:
        return name_or_path
    for folder in (paths.MODEL_DIR, cache_dir() / "digits-sd"):
        if (folder / "model_index.json").is_file():
            return str(folder)
    folder = cache_dir() / "digits-sd"
    logger.warning("no trained digits model found: training it now into %s (about 10 minutes on 2 CPU cores)",
                   folder)
    from erase.digits import build  # trains on first use only: not imported otherwise

    return str(build.train_pipeline(build.DigitsTrainingOptions(output_dir=str(folder))))
