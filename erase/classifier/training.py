"""Training and prediction loops of the classifier path."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from erase.saliency import MaskedUpdate

logger = logging.getLogger(__name__)


def batches(n: int, batch_size: int, generator: torch.Generator | None = None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    seed: int = 0,
    batch_size: int = 64,
    ascent: bool = False,
    l1: float = 0.0,
    mask: dict[str, torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """SGD with momentum and a cosine schedule; `ascent` maximises the loss (GA); `l1` adds a
    linearly decaying l1 penalty (l1-sparse); `mask` confines updates to the salient weights."""
    model.to(device).train()
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * -(-len(y) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    update = MaskedUpdate(model, mask).attach(optimizer) if mask is not None else None
    for epoch in range(epochs):
        for idx in batches(len(y), batch_size, g):
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            if ascent:
                loss = -loss
            if l1:  # Jia et al. 2023: alpha decays linearly to 0 over the run
                loss = loss + l1 * (1 - epoch / epochs) * sum(p.abs().sum() for p in model.parameters())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    if update is not None:
        update.remove()
    return model.eval()


@torch.no_grad()


def predict_proba(model: nn.Module, x: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([F.softmax(model(x[i : i + batch_size].to(device)), -1).cpu() for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str | torch.device = "cpu") -> float:
    return 100.0 * float((predict_proba(model, x, device).argmax(-1) == y).float().mean())
