"""Where the embedded model lives: its shipped assets, the cache, and `--model digits`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger("erase.digits")

MODEL_NAME = "digits"
DEFAULT_STEPS = 25  # DDIM steps
DEFAULT_GUIDANCE = 5.0  # classifier-free guidance scale

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets"
MODEL_DIR = ASSET_DIR / "digits-sd"
CLASSIFIER_PATH = ASSET_DIR / "digits_classifier.safetensors"


def cache_dir() -> Path:
    """Where models trained on first use go: $ERASE_CACHE_DIR, else ~/.cache/erase."""
    return Path(os.environ.get("ERASE_CACHE_DIR", Path.home() / ".cache" / "erase"))


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
    for folder in (MODEL_DIR, cache_dir() / "digits-sd"):
        if (folder / "model_index.json").is_file():
            return str(folder)
    folder = cache_dir() / "digits-sd"
    logger.warning("no trained digits model found: training it now into %s (about 10 minutes on 2 CPU cores)",
                   folder)
    from erase.digits import build  # trains on first use only: not imported otherwise

    return str(build.train_pipeline(build.DigitsTrainingOptions(output_dir=str(folder))))
