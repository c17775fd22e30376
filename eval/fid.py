"""FID between generated images and a reference set (a folder, or the original model's images).

torchmetrics' `FrechetInceptionDistance` does the arithmetic. Features, named in every report:

* `inception` - the standard InceptionV3 pool features; needs torch-fidelity, the `fid` extra
  (`pip install 'erase[fid]'`), and its weights (downloaded on first use);
* `digits` - the penultimate layer (128 features) of the embedded digits classifier, for the
  32x32 digits model: offline, and meaningful for digits only.

Images go in as uint8 (B, 3, H, W) (torchmetrics' `normalize=False` convention);
`DigitsFeatures` also accepts floats in [0, 1], as with `normalize=True`.

    python -m eval fid --model DIR --reference-model digits --features digits --out fid.json
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "DigitsFeatures",
    "FEATURES",
    "MissingExtraError",
    "evaluate_fid",
    "fid_from_images",
    "images_to_uint8",
    "make_fid",
]

FEATURES = ("inception", "digits")
FID_EXTRA_HINT = "pip install 'erase[fid]'"


class MissingExtraError(ImportError):
    """An optional dependency (an `erase[...]` extra) is not installed."""


class DigitsFeatures(nn.Module):
    """The digits classifier's penultimate layer as an FID feature extractor.

    Input: (B, 3, H, W) uint8 in [0, 255] or float in [0, 1]; output: (B, num_features) float.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = int(classifier.digit_head.in_features)

    def train(self, mode: bool = True) -> DigitsFeatures:
        return super().train(False)  # BatchNorm statistics must never move

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return self.classifier.features(x)


def inception_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def make_fid(features: str | nn.Module, device: str | torch.device = "cpu", **kwargs):
    """(FrechetInceptionDistance, feature name) for "inception", "digits" or any nn.Module
    mapping uint8 (B, 3, H, W) images to (B, D) features; `kwargs` go to the metric."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(features, nn.Module):
        # without `num_features` torchmetrics probes the module with a CPU image: build it there, then move
        module, name = features if hasattr(features, "num_features") else features.cpu(), type(features).__name__
    elif features == "digits":
        from erase.digits import load_digits_classifier

        module, name = DigitsFeatures(load_digits_classifier(device=device)), "digits-classifier-penultimate-128"
    elif features == "inception":
        if not inception_available():
            raise MissingExtraError(f"Inception features need torch-fidelity: {FID_EXTRA_HINT} "
                                    "(or use --features digits for the digits model)")
        try:
            return FrechetInceptionDistance(feature=2048, **kwargs).to(device), "inception-v3-pool3-2048"
        except Exception as err:
            raise ValueError(f"cannot load the Inception weights (offline?): {err}".splitlines()[0]) from err
    else:
        raise ValueError(f"unknown features {features!r}; choose from {FEATURES}")
    return FrechetInceptionDistance(feature=module, normalize=False, **kwargs).to(device), name


def images_to_uint8(images: Sequence[Image.Image | np.ndarray] | torch.Tensor) -> torch.Tensor:
    """PIL images, (H, W, 3) uint8 arrays or a (B, 3, H, W) tensor (uint8, or float in [0, 1]) -> uint8 (B, 3, H, W)."""
    if isinstance(images, torch.Tensor):
        return images if images.dtype == torch.uint8 else (images.clamp(0, 1) * 255).round().to(torch.uint8)
    arrays = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im, dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def update_fid(metric, images, real: bool, batch_size: int = 64) -> int:
    """Feed images to the metric in batches of one size each; returns how many went in."""
    batch: list = []
    count = 0

    def flush() -> None:
        nonlocal batch, count
        if batch:
            x = images_to_uint8(batch).to(metric.device)
            metric.update(x, real=real)
            count += len(batch)
            batch = []

    for im in images:
        size = im.size[::-1] if isinstance(im, Image.Image) else np.shape(im)[:2]
        if batch and (len(batch) == batch_size or _size(batch[0]) != tuple(size)):
            flush()
        batch.append(im)
    flush()
    return count


def _size(im) -> tuple[int, int]:
    return tuple(im.size[::-1]) if isinstance(im, Image.Image) else tuple(np.shape(im)[:2])


def fid_from_images(metric, generated, reference, batch_size: int = 64) -> float:
    """FID between two image collections (PIL images or (H, W, 3) uint8 arrays); resets `metric` first."""
    if len(generated) < 2 or len(reference) < 2:
        raise ValueError(f"FID needs at least 2 images on each side (got {len(generated)} and {len(reference)})")
    metric.reset()
    update_fid(metric, reference, real=True, batch_size=batch_size)
    update_fid(metric, generated, real=False, batch_size=batch_size)
    return _non_negative(float(metric.compute()))


def _non_negative(fid: float) -> float:
    """FID is a squared distance; eigenvalue round-off gives about -1e-4 for identical sets."""
    return max(0.0, fid)


def evaluate_fid(pipe, samples, num_inference_steps: int, metric, *, reference_pipe=None,
                 reference_paths: Sequence[str] | None = None, batch_size: int = 16, height: int | None = None,
                 width: int | None = None, state=None) -> dict:
    """FID of `pipe`'s images for `samples` against reference image files, or against
    `reference_pipe`'s images for the same samples (same prompts and seeds).

    Every process feeds its own shard to `metric`; torchmetrics sums the feature statistics over
    processes in `compute()` (called on every process), so no image crosses processes."""
    from eval.generate import generate_samples, score_folder

    if (reference_pipe is None) == (reference_paths is None):
        raise ValueError("give exactly one of reference_pipe and reference_paths")
    metric.reset()

    def feed(real: bool):
        def score(images: list[Image.Image]) -> list[None]:
            update_fid(metric, images, real=real)
            return [None] * len(images)

        return score

    kwargs = {"batch_size": batch_size, "height": height, "width": width, "state": state}
    num_generated = len(generate_samples(pipe, samples, num_inference_steps, score=feed(False),
                                         desc="generating + FID features", **kwargs))
    if reference_paths is not None:
        num_reference = len(score_folder(reference_paths, feed(True), batch_size=batch_size, state=state,
                                         desc="reference FID features"))
    else:
        num_reference = len(generate_samples(reference_pipe, samples, num_inference_steps, score=feed(True),
                                             desc="reference: generating + FID features", **kwargs))
    if num_generated < 2 or num_reference < 2:
        raise ValueError(f"FID needs at least 2 images on each side (got {num_generated} and {num_reference})")
    return {"fid": _non_negative(float(metric.compute())), "num_generated": num_generated,
            "num_reference": num_reference}
