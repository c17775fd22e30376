"""Where the embedded model's files live: the shipped assets, and the cache for what is trained on first use."""

from __future__ import annotations

import os
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets"
MODEL_DIR = ASSET_DIR / "digits-sd"
FLOW_MODEL_DIR = ASSET_DIR / "digits-flow"
CLASSIFIER_PATH = ASSET_DIR / "digits_classifier.safetensors"


def cache_dir() -> Path:
    """Where models trained on first use go: $ERASE_CACHE_DIR, else ~/.cache/erase."""
    return Path(os.environ.get("ERASE_CACHE_DIR", Path.home() / ".cache" / "erase"))
