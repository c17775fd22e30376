"""SalUn and the baselines (Retrain, FT, GA, RL, l1-sparse) on the shared masking core, and one run."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from erase.classifier.data import DATASETS, Dataset, check_forget_spec, load_dataset, parse_forget, random_wrong_labels
from erase.classifier.metrics import evaluate
from erase.classifier.model import ResNet
from erase.classifier.training import batches, train
from erase.command import check_positive
from erase.saliency import check_ratio, compute_saliency_mask

logger = logging.getLogger(__name__)


METHODS = ("retrain", "ft", "ga", "rl", "l1-sparse", "salun")


# learning rates chosen by bench/classifier.py's search on a held-out seed (digits, random:0.1)
DEFAULT_LR = {"retrain": 0.05, "ft": 0.05, "ga": 0.001, "rl": 0.01, "l1-sparse": 0.05, "salun": 0.01}


@dataclass
class UnlearnConfig:
    """Options of one unlearning run (`python -m erase.classifier`)."""

    dataset: str = field(default="digits", metadata={"help": "digits (offline) or cifar10 (hub)"})
    forget: str = field(default="random:0.1", metadata={"help": "random:FRACTION, class:K or indices:FILE.json"})
    method: str = field(default="salun", metadata={"help": "one of " + ", ".join(METHODS)})
    lr: float | None = field(default=None, metadata={"help": "unlearning learning rate (default per method)"})
    epochs: int = field(default=10, metadata={"help": "unlearning epochs (retrain uses train_epochs)"})
    train_epochs: int = field(default=30, metadata={"help": "epochs of the original model and of Retrain"})
    train_lr: float = field(default=0.05, metadata={"help": "learning rate of the original model"})
    mask_ratio: float = field(default=0.5, metadata={"help": "fraction of weights SalUn may update, in (0, 1]"})
    label_noise: float = field(default=0.0, metadata={"help": "fraction of training labels flipped to a random other class, in [0, 1)"})
    l1: float = field(default=5e-4, metadata={"help": "initial l1 penalty of l1-sparse"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    seed: int = field(default=0, metadata={"help": "data split, forget set, weights and batches"})

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        check_ratio(self.mask_ratio)
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        if self.lr <= 0 or self.epochs < 1 or self.train_epochs < 1:
            raise ValueError("lr must be > 0 and epochs >= 1")
        check_positive(train_lr=self.train_lr, batch_size=self.batch_size)
        if self.l1 < 0:
            raise ValueError(f"l1 must be >= 0, got {self.l1}")
        check_forget_spec(self.forget)
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")


def train_original(data: Dataset, cfg: UnlearnConfig, device: str | torch.device = "cpu", keep: torch.Tensor | None = None) -> nn.Module:
    """The model before unlearning (keep=None) or the Retrain model (keep = retain mask)."""
    torch.manual_seed(cfg.seed)
    model = ResNet(data.train_x.shape[1], data.num_classes)
    x, y = (data.train_x, data.train_y) if keep is None else (data.train_x[keep], data.train_y[keep])
    return train(model, x, y, cfg.train_epochs, cfg.train_lr, cfg.seed, cfg.batch_size, device=device)


def unlearn(original: nn.Module, data: Dataset, forget_idx: torch.Tensor, cfg: UnlearnConfig, device: str | torch.device = "cpu") -> nn.Module:
    """Apply `cfg.method` to a copy of the original model."""
    import copy

    keep = torch.ones(len(data.train_y), dtype=torch.bool)
    keep[forget_idx] = False
    if cfg.method == "retrain":
        return train_original(data, cfg, device, keep=keep)
    model = copy.deepcopy(original).to(device)
    fx, fy = data.train_x[forget_idx], data.train_y[forget_idx]
    rx, ry = data.train_x[keep], data.train_y[keep]
    common = dict(epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed, batch_size=cfg.batch_size, device=device)
    if cfg.method == "ft":
        return train(model, rx, ry, **common)
    if cfg.method == "l1-sparse":
        return train(model, rx, ry, l1=cfg.l1, **common)
    if cfg.method == "ga":
        return train(model, fx, fy, ascent=True, **common)
    # RL and SalUn: forget set with random wrong labels + retain set with true labels
    x = torch.cat([fx, rx])
    y = torch.cat([random_wrong_labels(fy, data.num_classes, cfg.seed), ry])
    mask = None
    if cfg.method == "salun":
        mask = saliency_mask(model, fx, fy, cfg.mask_ratio, cfg.batch_size, device)
    return train(model, x, y, mask=mask, **common)


def saliency_mask(model: nn.Module, fx: torch.Tensor, fy: torch.Tensor, ratio: float, batch_size: int, device) -> dict[str, torch.Tensor]:
    """SalUn Eq. 5: |sum over the forget set of grad CE(true labels)|, top `ratio` globally."""
    model.eval()  # BatchNorm statistics stay fixed while the gradient is measured

    def loss_fn(m, idx):
        return F.cross_entropy(m(fx[idx].to(device)), fy[idx].to(device), reduction="sum")

    return compute_saliency_mask(model, loss_fn, list(batches(len(fy), batch_size)), ratio, show_progress=False)


def run(cfg: UnlearnConfig, device: str | torch.device = "cpu", original: nn.Module | None = None) -> dict:
    """Train the original model (or reuse `original`), unlearn, and evaluate. Returns the report."""
    data = load_dataset(cfg.dataset, seed=cfg.seed, label_noise=cfg.label_noise)
    forget_idx = parse_forget(cfg.forget, data.train_y, seed=cfg.seed)
    if original is None:
        original = train_original(data, cfg, device)
    start = time.perf_counter()
    model = unlearn(original, data, forget_idx, cfg, device)
    seconds = time.perf_counter() - start
    return {
        "config": asdict(cfg),
        "forget_size": len(forget_idx),
        "forget_mislabeled": int(torch.isin(forget_idx, data.mislabeled).sum()),
        "metrics": evaluate(model, data, forget_idx, device),
        "original_metrics": evaluate(original, data, forget_idx, device),
        "seconds": seconds,
        "torch": torch.__version__,
    }
