"""`--model digits` and `--model digits-flow`: recognising the embedded models (and models erased
from them), their sampler defaults, and resolving them to folders (trained into the cache on first
use if missing)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from erase.defaults import DIGITS_FLOW_NAME, DIGITS_GUIDANCE, DIGITS_MODEL_NAME, DIGITS_STEPS
from erase.digits import paths
from erase.digits.paths import cache_dir

logger = logging.getLogger("erase.digits")

MODEL_NAME, FLOW_MODEL_NAME = DIGITS_MODEL_NAME, DIGITS_FLOW_NAME
MODEL_NAMES = (MODEL_NAME, FLOW_MODEL_NAME)
DEFAULT_STEPS, DEFAULT_GUIDANCE = DIGITS_STEPS, DIGITS_GUIDANCE


def is_digits_model(name_or_path: str, _depth: int = 0) -> bool:
    """An embedded model, or a folder erased from one (erase/train.py's erase_config.json says so)."""
    if name_or_path in MODEL_NAMES:
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
    """Map "digits" / "digits-flow" to the embedded pipeline's folder (trained on first use if missing);
    pass others through."""
    if name_or_path not in MODEL_NAMES:
        return name_or_path
    shipped = paths.MODEL_DIR if name_or_path == MODEL_NAME else paths.FLOW_MODEL_DIR
    cached = cache_dir() / ("digits-sd" if name_or_path == MODEL_NAME else "digits-flow")
    for folder in (shipped, cached):
        if (folder / "model_index.json").is_file():
            return str(folder)
    logger.warning("no trained %s model found: training it now into %s (about 10 minutes on 2 CPU cores)",
                   name_or_path, cached)
    if name_or_path == FLOW_MODEL_NAME:
        from erase.digits import flow  # trains on first use only: not imported otherwise

        return str(flow.train_flow_pipeline(flow.FlowTrainingOptions(output_dir=str(cached))))
    from erase.digits import build

    return str(build.train_pipeline(build.DigitsTrainingOptions(output_dir=str(cached))))
