"""The embedded model's data: scikit-learn digits split by index, upscaled and coloured."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from erase.digits.prompts import COLOUR_RGB, COLOURS

RESOLUTION = 32  # pixels; the VAE maps 32x32x3 to an 8x8x4 latent
SPLITS = {"generator": range(0, 5), "classifier": range(5, 9), "test": range(9, 10)}


def load_split(part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 8, 8) in [0, 1] and digit labels (N,) of one split (see the module doc)."""
    from sklearn.datasets import load_digits

    if part not in SPLITS:
        raise ValueError(f"unknown split {part!r}; choose from {list(SPLITS)}")
    data = load_digits()
    index = np.arange(len(data.target))
    keep = np.isin(index % 10, list(SPLITS[part]))
    images = torch.tensor(data.images[keep] / 16.0, dtype=torch.float32)
    return images, torch.tensor(data.target[keep], dtype=torch.long)


def render_digits(images: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) grey digits in [0, 1] and colour indices (N,) -> (N, 3, 32, 32) RGB in [0, 1]."""
    grey = F.interpolate(images[:, None], size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    rgb = torch.tensor([COLOUR_RGB[c] for c in COLOURS], dtype=images.dtype)[colours]  # (N, 3)
    return grey.clamp(0, 1) * rgb[:, :, None, None]


def coloured_split(part: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every image of a split in every colour: RGB (N*C, 3, 32, 32), digits, colour indices."""
    images, digits = load_split(part)
    n, c = len(digits), len(COLOURS)
    colours = torch.arange(c).repeat_interleave(n)
    return render_digits(images.repeat(c, 1, 1), colours), digits.repeat(c), colours


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Indices of `steps` batches, walking through seeded permutations of range(n)."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]
