"""Data-wise and class-wise search on an image classifier (the lower level: FT, RL, GA or SalUn)."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from erase.saliency import compute_saliency_mask
from erase.worst_case.config import WorstCaseConfig, random_start, report
from erase.worst_case.solver import (
    LowerOptions,
    accumulate,
    resolve_size,
    search,
    unlearning_steps,
)


def _per_sample_terms(method: str, logits: torch.Tensor, y: torch.Tensor, y_wrong: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(retain_j, forget_j) of the unlearning method, per sample (see the module docstring)."""
    ce = F.cross_entropy(logits, y, reduction="none")
    zero = torch.zeros_like(ce)
    if method == "ft":
        return ce, zero
    if method == "ga":
        return zero, -ce
    return ce, F.cross_entropy(logits, y_wrong, reduction="none")  # rl, salun


class ClassifierProblem:
    """Data-wise (one item per training sample) or class-wise (one item per class) search.

    `groups[j]` is the item of training sample j: arange(N) for data, the labels for classes.
    The item loss is the mean cross-entropy (true labels) of its samples after unlearning.
    """

    def __init__(self, original: nn.Module, x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, num_items: int,
                 y_wrong: torch.Tensor, lower: LowerOptions, device: str | torch.device = "cpu", eval_batch_size: int = 512):
        self.original, self.x, self.y, self.y_wrong = original, x, y, y_wrong
        self.groups, self.num_items, self.opts, self.device = groups.cpu(), num_items, lower, device  # w, counts: CPU
        self.counts = torch.bincount(self.groups, minlength=num_items).double()
        if (self.counts == 0).any():
            raise ValueError("every item needs at least one training sample")
        self.eval_batch_size = eval_batch_size

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def _chunks(self):
        for i in range(0, len(self.y), self.eval_batch_size):
            yield slice(i, i + self.eval_batch_size)

    def _mask(self, model: nn.Module, sample_w: torch.Tensor) -> dict[str, torch.Tensor]:
        """SalUn Eq. 5 with per-sample weights: |grad sum_j w_j CE_j|, top mask_ratio globally."""
        model.eval()

        def loss_fn(m, sl):
            ce = F.cross_entropy(m(self.x[sl].to(self.device)), self.y[sl].to(self.device), reduction="none")
            return (sample_w[sl].to(ce) * ce).sum()

        return compute_saliency_mask(model, loss_fn, list(self._chunks()), self.opts.mask_ratio, show_progress=False)

    def lower(self, w: torch.Tensor) -> nn.Module:
        opts = self.opts
        model = copy.deepcopy(self.original).to(self.device)
        sample_w = w[self.groups].float()
        mask = self._mask(model, sample_w) if opts.method == "salun" else None

        def terms(g: torch.Generator):
            idx = torch.randint(0, len(self.y), (opts.batch_size,), generator=g)
            logits = model(self.x[idx].to(self.device))
            retain, forget = _per_sample_terms(opts.method, logits, self.y[idx].to(self.device), self.y_wrong[idx].to(self.device))
            return retain, forget, sample_w[idx].to(logits)

        return unlearning_steps(model, self.trainable(model), mask, opts, terms)

    def _scatter_mean(self, per_sample: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(self.num_items, dtype=torch.float64).index_add_(0, self.groups, per_sample.double())
        return total / self.counts

    @torch.no_grad()
    def item_losses(self, model: nn.Module) -> torch.Tensor:
        model.eval()
        ce = [F.cross_entropy(model(self.x[sl].to(self.device)), self.y[sl].to(self.device), reduction="none").cpu() for sl in self._chunks()]
        return self._scatter_mean(torch.cat(ce))

    def upper_gradient(self, model: nn.Module, w: torch.Tensor) -> list[torch.Tensor]:
        model.eval()
        params = self.trainable(model)
        sample_w = (w / self.counts)[self.groups].float()  # item loss = mean over its samples
        total = [torch.zeros_like(p) for p in params]
        for sl in self._chunks():
            ce = F.cross_entropy(model(self.x[sl].to(self.device)), self.y[sl].to(self.device), reduction="none")
            accumulate(total, torch.autograd.grad((sample_w[sl].to(ce) * ce).sum(), params, allow_unused=True))
        return total

    @torch.no_grad()
    def lower_partials(self, model: nn.Module) -> torch.Tensor:
        model.eval()
        diffs = []
        for sl in self._chunks():
            retain, forget = _per_sample_terms(self.opts.method, model(self.x[sl].to(self.device)), self.y[sl].to(self.device),
                                               self.y_wrong[sl].to(self.device))
            diffs.append((forget - retain).cpu())
        total = torch.zeros(self.num_items, dtype=torch.float64).index_add_(0, self.groups, torch.cat(diffs).double())
        return total / len(self.y)


def classifier_problem(cfg: WorstCaseConfig, data, original: nn.Module, device: str | torch.device = "cpu") -> ClassifierProblem:
    from erase.classifier import random_wrong_labels

    y = data.train_y
    groups, n = (torch.arange(len(y)), len(y)) if cfg.target == "data" else (y, data.num_classes)
    y_wrong = random_wrong_labels(y, data.num_classes, cfg.seed)
    return ClassifierProblem(original, data.train_x, y, groups, n, y_wrong, cfg.lower_options(), device)


def forget_indices(cfg: WorstCaseConfig, selected: Sequence[int], train_y: torch.Tensor) -> list[int]:
    """Training-set indices of the selected items (samples, or every sample of the selected classes)."""
    if cfg.target == "data":
        return sorted(int(i) for i in selected)
    return torch.nonzero(torch.isin(train_y, torch.tensor(list(selected), device=train_y.device))).flatten().tolist()


def run_classifier(cfg: WorstCaseConfig, device: str | torch.device = "cpu", original: nn.Module | None = None,
                   show_progress: bool = True) -> dict:
    """Data- or class-wise search on a freshly trained (or the given) original model."""
    from erase.classifier import UnlearnConfig, load_dataset, train_original

    data = load_dataset(cfg.dataset, seed=cfg.seed, label_noise=cfg.label_noise)
    resolve_size(cfg.size, len(data.train_y) if cfg.target == "data" else data.num_classes)  # fail before training
    start = time.perf_counter()
    if original is None:
        original = train_original(data, UnlearnConfig(dataset=cfg.dataset, method="retrain", seed=cfg.seed,
                                                      label_noise=cfg.label_noise, train_epochs=cfg.train_epochs,
                                                      train_lr=cfg.train_lr), device)
    seconds_original = time.perf_counter() - start
    problem = classifier_problem(cfg, data, original, device)
    m = resolve_size(cfg.size, problem.num_items)
    result = search(problem, m, cfg.search_options(show_progress), random_start(problem.num_items, m, cfg.seed))
    indices = forget_indices(cfg, result.selected, data.train_y)
    return report(cfg, result, m, problem.num_items, indices=indices, seconds_original=seconds_original,
                   note=f"indices into the training split of load_dataset({cfg.dataset!r}, seed={cfg.seed}, "
                        f"label_noise={cfg.label_noise}); use them with the same --seed and --label-noise")
