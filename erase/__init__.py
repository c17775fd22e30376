"""Concept erasure for text-to-image diffusion models and image classifiers (SalUn)."""

from erase.saliency import (
    MaskedUpdate,
    compute_saliency_mask,
    global_topk_mask,
    load_mask,
    save_mask,
)

__all__ = ["MaskedUpdate", "compute_saliency_mask", "global_topk_mask", "load_mask", "save_mask"]
__version__ = "0.1.0"
