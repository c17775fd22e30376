"""Exports of an erased pipeline for the tools people run models in (`python -m erase.export`).

- `lora`: a truncated SVD of every changed layer's weight change, in diffusers' LoRA layout
  (`pipe.load_lora_weights`) or kohya's (A1111, ComfyUI);
- `single-file`: one checkpoint in the original Stable Diffusion layout (`from_single_file`);
- `delta`: only the tensors that changed, written back over the original with `apply_delta`.
"""

import os

# Why here, before any import: transformers prints notes about optional packages (torchvision) when
# diffusers first imports it; `python -m erase.export`'s stderr should hold only its one-line errors.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from erase.export.delta import apply_delta, export_delta
from erase.export.lora import export_lora
from erase.export.single_file import export_single_file

__all__ = ["apply_delta", "export_delta", "export_lora", "export_single_file"]
