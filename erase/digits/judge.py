"""The judging classifier: a small two-head CNN (digit, colour) trained on the held-out split."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from erase.atomic import replace_path
from erase.digits.data import RESOLUTION, SPLITS, batches, coloured_split
from erase.digits.paths import CLASSIFIER_PATH, cache_dir
from erase.digits.prompts import COLOURS

logger = logging.getLogger("erase.digits")


class DigitsClassifier(nn.Module):
    """A small CNN with two heads: digit (10 classes) and colour (len(COLOURS) classes).

    Input: RGB float images in [0, 1], (B, 3, H, W); other sizes are resized to 32x32.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, num_colours: int = len(COLOURS)) -> None:
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_colours": num_colours}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        # 32 -> 16 -> 8 -> 4 spatially
        self.body = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                                  nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.ReLU())
        self.digit_head = nn.Linear(feature_dim, 10)
        self.colour_head = nn.Linear(feature_dim, num_colours)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, feature_dim)."""
        if x.shape[-2:] != (RESOLUTION, RESOLUTION):
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.digit_head(h), self.colour_head(h)


@dataclass
class ClassifierTrainingOptions:
    """Options of `train_classifier`; saved in the safetensors metadata."""

    output_path: str = field(default=str(CLASSIFIER_PATH), metadata={"help": "safetensors file to write"})
    seed: int = field(default=0, metadata={"help": "seeds weights, data order and augmentation"})
    epochs: int = field(default=25, metadata={"help": "passes over the classifier split in every colour"})
    batch_size: int = field(default=128, metadata={"help": "images per step"})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate (cosine decay)"})

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("epochs, batch_size and learning_rate must be positive")


def _augment(rgb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shifts, brightness, colour tint and noise, so generated (imperfect) digits are judged fairly."""
    n = len(rgb)
    shifts = torch.randint(-2, 3, (n, 2), generator=generator).tolist()
    out = torch.stack([torch.roll(im, shifts=s, dims=(1, 2)) for im, s in zip(rgb, shifts, strict=True)])
    out = out * (0.6 + 0.5 * torch.rand(n, 1, 1, 1, generator=generator))
    tint = 1 + 0.3 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
    leak = 0.15 * torch.rand(n, 3, 1, 1, generator=generator) * out.amax(dim=1, keepdim=True)
    out = out * tint + leak
    return (out + 0.04 * torch.randn(out.shape, generator=generator)).clamp(0, 1)


def train_classifier(opts: ClassifierTrainingOptions) -> DigitsClassifier:
    """Train on the "classifier" split in every colour (never the generator's images); save it."""
    start = time.time()
    torch.manual_seed(opts.seed)
    generator = torch.Generator().manual_seed(opts.seed)
    rgb, digits, colours = coloured_split("classifier")
    model = DigitsClassifier()
    steps_per_epoch = math.ceil(len(rgb) / opts.batch_size)
    total = opts.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.learning_rate, weight_decay=1e-4)
    lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    model.train()
    for index in tqdm(batches(len(rgb), opts.batch_size, total, generator), total=total, desc="digits classifier"):
        digit_logits, colour_logits = model(_augment(rgb[index], generator))
        loss = F.cross_entropy(digit_logits, digits[index]) + F.cross_entropy(colour_logits, colours[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
    model.eval()
    record = {"options": asdict(opts), "train_seconds": round(time.time() - start, 1)}
    save_classifier(model, Path(opts.output_path), record)
    return model


def save_classifier(model: DigitsClassifier, path: Path, record: dict | None = None) -> None:
    """Weights as safetensors (no pickle); architecture, colours and split in its metadata."""
    from safetensors.torch import save_file

    metadata = {"config": json.dumps(model.config), "colours": json.dumps(COLOURS),
                "split": json.dumps({k: list(v) for k, v in SPLITS.items()}), "record": json.dumps(record or {})}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    replace_path(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def load_digits_classifier(
    device: str | torch.device | None = None, path: str | Path | None = None
) -> DigitsClassifier:
    """The held-out digits classifier in eval mode (trained into the cache on first use if missing)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else _classifier_path()
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    if json.loads(metadata["colours"]) != COLOURS:
        raise ValueError(f"{path} was trained for colours {metadata['colours']}, not {COLOURS}")
    model = DigitsClassifier(**json.loads(metadata["config"]))
    model.load_state_dict(load_file(str(path)))
    return model.to(device or "cpu").eval()


def _classifier_path() -> Path:
    cached = cache_dir() / "digits_classifier.safetensors"
    for path in (CLASSIFIER_PATH, cached):
        if path.is_file():
            return path
    logger.warning("no trained digits classifier found: training it now into %s (about a minute)", cached)
    train_classifier(ClassifierTrainingOptions(output_path=str(cached)))
    return cached


def _to_tensor(images) -> torch.Tensor:
    """A list of PIL images, or a (B, 3, H, W) tensor, -> float (B, 3, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float() / 255 if images.dtype == torch.uint8 else images.float()
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@torch.no_grad()
def classify_images(images, classifier: nn.Module, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted digit and colour indices, (B,) each, for PIL images or a (B, 3, H, W) tensor in [0, 1]."""
    x = _to_tensor(images)
    device = next(classifier.parameters()).device
    preds = [classifier(chunk.to(device)) for chunk in x.split(batch_size)]
    digit = torch.cat([p[0].argmax(-1) for p in preds]).cpu()
    colour = torch.cat([p[1].argmax(-1) for p in preds]).cpu()
    return digit, colour
