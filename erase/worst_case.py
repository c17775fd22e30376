"""Worst-case forget sets: the data, classes or prompts that are hardest to unlearn.

"Challenging Forgets" (Fan, Liu, Hero and Liu, ECCV 2024, arXiv:2403.07362) picks the forget
set adversarially instead of at random, by bi-level optimisation over weights w in [0, 1]^n
on n candidate items (training samples, classes or prompts) with sum(w) = m:

    min_w  sum_i w_i * l_i(theta(w)) + gamma * ||w||^2              (upper level)
    theta(w) = a few unlearning steps from theta_0 on                  (lower level)
               L_MU(theta; w) = mean_j [(1 - w_j) * retain_j(theta) + w_j * forget_j(theta)]

l_i is the forget loss of item i *after* unlearning (cross-entropy with the true label for a
classifier, averaged over the class for class-wise search; the denoising loss of the prompt's
own images for Stable Diffusion, or with `prompt_loss="contrast"` that loss minus the same loss
under the anchor prompt, so that how easy a prompt's images are to denoise at all cancels out):
minimising it
selects the items the unlearned model still fits best, i.e. the hardest to forget. retain_j and
forget_j are the unlearning method's two terms (FT: CE / 0; RL and SalUn: CE / CE with a random
wrong label; GA: 0 / -CE; SalUn for diffusion: beta * denoising MSE / MSE to the anchor
prompt's prediction; ESD: 0 / MSE to the negatively guided target). The final set is the top m
of w.

Upper-level step (projected gradient descent):

    w <- P(w - w_lr * z(g)),   g = dF/dw,  z = a robust z-score,   P = projection onto {0 <= w <= 1, sum w = m}

P is computed by bisection on the shift mu of clamp(a - mu, 0, 1) (`project_capped_simplex`).
The reference code steps by w_lr * g without normalisation; with the small losses of a trained
model that step is far below the spacing of the projection and w stays at its random start,
so g is replaced by a robust z-score across items (centred at the median, divided by the
scaled median absolute deviation, clipped at +-3; `normalised_step`): w_lr is then the typical
change of one weight per step. A constant added to g does not change P(w - g), and the ordering
of the items' gradients is kept. Keep w_lr small (0.1): items outside the set are trained on by
the lower level and so always look well fitted; large steps swap the whole set at once and the
search oscillates between the current forget set and its complement (measured on digits: w_lr
0.3 raised the upper objective, 0.05-0.1 lowered it monotonically).

Hypergradient (`SearchOptions.hypergradient`):

* ``"direct"`` (default): dF/dw_i = l_i(theta_K) + 2 gamma w_i, what the reference code of the
  paper computes (OPTML-Group/Unlearn-WorstCase). It is exact, not an approximation, when the
  lower level is sign-SGD (the paper's choice and the default here for data and classes): the
  Jacobian d theta_K / d w of K sign steps is zero almost everywhere (sign is piecewise
  constant). With Adam (the default for prompts, as in the paper's prompt-wise ESD code) it
  drops the implicit term.
* ``"unrolled"``: the direct term plus a one-step unrolled implicit term. The last lower step is
  treated as a plain gradient step theta_K = theta_{K-1} - eta * grad L_MU, which gives
  d theta_K / d w_i = -eta * grad_theta (forget_i - retain_i) / N, and with theta_{K-1} ~ theta_K
  the extra term is -eta / N * <grad_theta F, grad_theta (forget_i - retain_i)>, evaluated for all
  i at once by a central finite difference of (forget_i - retain_i) along grad_theta F (two
  forward passes, no Hessian). eta = `unroll_lr`.

The output of `--target data|class` is a JSON list of training indices (an `indices:` file for
`python -m erase.classifier`; they index the split of `load_dataset(dataset, seed, label_noise)`,
so pass the same --seed and --label-noise); of `--target prompt` a JSON list of prompts.
`--report` adds w, the search history and timings.

    python -m erase.worst_case --target data --dataset digits --size 0.1 --method rl --out forget.json
    python -m erase.classifier --dataset digits --forget indices:forget.json --method rl --out r.json
    python -m erase.worst_case --target prompt --model digits --size 4 --method salun --out prompts.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from erase.saliency import MaskedUpdate, check_ratio, compute_saliency_mask

logger = logging.getLogger(__name__)

__all__ = [
    "BilevelProblem",
    "ClassifierProblem",
    "LowerOptions",
    "PromptProblem",
    "SearchOptions",
    "SearchResult",
    "SignSGD",
    "WorstCaseConfig",
    "build_prompt_problem",
    "classifier_problem",
    "digits_candidates",
    "forget_indices",
    "hypergradient",
    "implicit_term",
    "project_capped_simplex",
    "random_start",
    "resolve_size",
    "run",
    "run_classifier",
    "run_prompt",
    "search",
    "top_m",
]

TARGETS = ("data", "class", "prompt")
CLASSIFIER_METHODS = ("ft", "rl", "ga", "salun")
PROMPT_METHODS = ("salun", "rl", "esd-x", "esd-u")
HYPERGRADIENTS = ("direct", "unrolled")
OPTIMIZERS = ("sign", "adam")
PROMPT_LOSSES = ("denoising", "contrast")


# ----------------------------------------------------------------------------- projection


def project_capped_simplex(a: torch.Tensor, m: float, tol: float = 1e-9, max_iter: int = 200) -> torch.Tensor:
    """Euclidean projection of `a` onto {w : 0 <= w_i <= 1, sum(w) = m}.

    The solution is clamp(a - mu, 0, 1) for the shift mu at which the sum equals m; that sum is
    continuous and non-increasing in mu, n at mu = min(a) - 1 and 0 at mu = max(a), so mu is found
    by bisection, then solved exactly on the linear piece it lands on. Computed in float64,
    returned in the dtype of `a`.
    """
    n = a.numel()
    if not 0 <= m <= n:
        raise ValueError(f"the sum m = {m} must lie in [0, {n}]")
    x = a.detach().double()

    def excess(mu: float) -> float:
        return float((x - mu).clamp(0, 1).sum()) - m

    lo, hi = float(x.min()) - 1.0, float(x.max())
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    mu = 0.5 * (lo + hi)
    # polish: on the segment bisection found, the sum is linear in mu, so solve it exactly
    free, upper = (x - mu > 0) & (x - mu < 1), x - mu >= 1
    if free.any():
        exact = (float(x[free].sum()) + int(upper.sum()) - m) / int(free.sum())
        if abs(exact - mu) <= max(tol, 1e-12) * 10:
            mu = exact
    return (x - mu).clamp(0, 1).to(a.dtype)


def top_m(w: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of the m largest weights, sorted; ties go to the lower index."""
    order = torch.sort(-w.detach().double(), stable=True).indices
    return order[:m].sort().values


def resolve_size(size: str | float | int, n: int) -> int:
    """`0.1` -> a fraction of the n candidates (rounded); `K` (an integer >= 1) -> K items."""
    try:
        value = float(size)
    except (TypeError, ValueError):
        value = float("nan")
    if 0 < value < 1:
        m = round(value * n)
    elif value >= 1 and value == int(value):
        m = int(value)
    else:
        m = -1
    if not 1 <= m < n:
        raise ValueError(f"--size {size!r} must be a fraction in (0, 1) or a count K with 1 <= K < {n} (the number of candidates)")
    return m


# ----------------------------------------------------------------------------- lower-level optimizer


class SignSGD(torch.optim.Optimizer):
    """theta <- theta - lr * sign(grad) (Bernstein et al., 2018): the paper's lower-level solver."""

    def __init__(self, params, lr: float) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        """One sign step on every parameter that has a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])
        return None


def make_optimizer(params: Sequence[nn.Parameter], kind: str, lr: float) -> torch.optim.Optimizer:
    return SignSGD(params, lr) if kind == "sign" else torch.optim.Adam(params, lr=lr)


# ----------------------------------------------------------------------------- the bi-level solver


class BilevelProblem(Protocol):
    """What `search` needs from a target (data, classes, prompts)."""

    num_items: int

    def lower(self, w: torch.Tensor) -> nn.Module:
        """A copy of the original model after a few unlearning steps weighted by w (n,)."""

    def item_losses(self, model: nn.Module) -> torch.Tensor:
        """Upper-level forget loss l_i of every item (n,), no gradient."""

    def upper_gradient(self, model: nn.Module, w: torch.Tensor) -> list[torch.Tensor]:
        """grad_theta sum_i w_i l_i(theta), one tensor per `trainable(model)` parameter."""

    def lower_partials(self, model: nn.Module) -> torch.Tensor:
        """dL_MU/dw_i = sum over item i's samples of (forget_j - retain_j) / N, (n,), no gradient."""

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters the lower level updates."""


@dataclass
class SearchOptions:
    """Options of the upper level (`search`)."""

    outer_steps: int = field(default=20, metadata={"help": "upper-level steps (each runs the lower level once)"})
    w_lr: float = field(default=0.1, metadata={"help": "upper step size, in units of the normalised gradient (a robust z-score)"})
    gamma: float = field(default=1e-4, metadata={"help": "weight of gamma * ||w||^2 in the upper objective"})
    hypergradient: str = field(default="direct", metadata={"help": "direct (the paper's, sign-SGD) or unrolled (+ one-step implicit term)"})
    unroll_lr: float = field(default=0.005, metadata={"help": "eta of the unrolled last lower step (hypergradient=unrolled)"})
    fd_step: float = field(default=1e-3, metadata={"help": "parameter-space step of the finite difference (unrolled)"})
    show_progress: bool = field(default=True, metadata={"help": "tqdm bar over the upper steps"})

    def __post_init__(self) -> None:
        if self.outer_steps < 0:
            raise ValueError(f"outer_steps must be >= 0, got {self.outer_steps}")
        if self.w_lr <= 0 or self.gamma < 0 or self.unroll_lr < 0 or self.fd_step <= 0:
            raise ValueError("w_lr and fd_step must be > 0, gamma and unroll_lr >= 0")
        if self.hypergradient not in HYPERGRADIENTS:
            raise ValueError(f"unknown hypergradient {self.hypergradient!r}; choose from {', '.join(HYPERGRADIENTS)}")


@dataclass
class SearchResult:
    selected: list[int]  # top-m items of the final w, sorted
    start: list[int]  # top-m items of the starting w
    w: list[float]  # final weights
    history: list[dict]  # per upper step: upper objective (at theta(w)), overlap with the start
    seconds: float


def _accumulate(total: list[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """total += grads, skipping parameters the loss does not reach (None under allow_unused)."""
    for t, g in zip(total, grads, strict=True):
        if g is not None:
            t.add_(g)


@torch.no_grad()
def _shift(params: Sequence[nn.Parameter], direction: Sequence[torch.Tensor], alpha: float) -> None:
    for p, d in zip(params, direction):
        p.add_(d, alpha=alpha)


def implicit_term(problem: BilevelProblem, model: nn.Module, w: torch.Tensor, opts: SearchOptions) -> torch.Tensor:
    """-eta * <grad_theta F, grad_theta dL_MU/dw_i> for every i: a central finite difference of
    dL_MU/dw_i along grad_theta F (see the module docstring, "unrolled")."""
    params = problem.trainable(model)
    v = problem.upper_gradient(model, w)
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in v))
    if norm == 0:
        return torch.zeros_like(w)
    saved = [p.detach().clone() for p in params]
    h = opts.fd_step
    _shift(params, v, h / norm)
    plus = problem.lower_partials(model)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    _shift(params, v, -h / norm)
    minus = problem.lower_partials(model)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    directional = norm * (plus - minus).double() / (2 * h)  # <v, grad h_i>
    return -opts.unroll_lr * directional


def hypergradient(problem: BilevelProblem, model: nn.Module, w: torch.Tensor, opts: SearchOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(dF/dw, item losses): the direct term l_i + 2 gamma w_i, plus the implicit term if unrolled."""
    losses = problem.item_losses(model).double()
    grad = losses + 2 * opts.gamma * w
    if opts.hypergradient == "unrolled":
        grad = grad + implicit_term(problem, model, w, opts)
    return grad, losses


def normalised_step(grad: torch.Tensor, clip: float = 3.0) -> torch.Tensor:
    """A robust z-score of the hypergradient: (g - median) / (1.4826 * median |g - median|),
    clipped to [-clip, clip]; zero when all items tie.

    The forget losses of a trained model are heavy-tailed (a few misfit samples sit 1000x above
    the median): a scale set by them (std, max) would freeze the ordering of all other items.
    A per-item monotone rescaling with one shared scale keeps g's ordering and signs."""
    centred = grad - grad.median()
    scale = 1.4826 * centred.abs().median()
    if scale == 0:
        scale = centred.abs().mean()
    return (centred / scale).clamp(-clip, clip) if scale > 0 else torch.zeros_like(grad)


def search(problem: BilevelProblem, m: int, opts: SearchOptions, w0: torch.Tensor) -> SearchResult:
    """Projected hypergradient descent on w from `w0` (e.g. a random set's 0/1 indicator)."""
    n = problem.num_items
    if w0.shape != (n,):
        raise ValueError(f"w0 must have shape ({n},), got {tuple(w0.shape)}")
    start_time = time.perf_counter()
    w = project_capped_simplex(w0.cpu().double(), m)  # the upper level lives on the CPU, as the item losses
    start = top_m(w, m)
    history = []
    for step in tqdm(range(opts.outer_steps), desc="worst-case search", disable=not opts.show_progress):
        model = problem.lower(w)  # lower level: theta(w), from the original model every time
        grad, losses = hypergradient(problem, model, w, opts)
        objective = float((w * losses).sum() + opts.gamma * (w * w).sum())  # F(w) before the step
        w = project_capped_simplex(w - opts.w_lr * normalised_step(grad), m)
        chosen = top_m(w, m)
        history.append({
            "step": step + 1,
            "upper_objective": objective,
            "selected_forget_loss": float(losses[chosen].mean()),
            "overlap_with_start": len(set(chosen.tolist()) & set(start.tolist())) / m,
        })
        logger.info("upper step %d: %s", step + 1, history[-1])
    return SearchResult(top_m(w, m).tolist(), start.tolist(), w.float().tolist(), history, time.perf_counter() - start_time)


# ----------------------------------------------------------------------------- classifier targets


@dataclass
class LowerOptions:
    """The lower level: a few weighted unlearning steps from the original model."""

    method: str = "rl"
    steps: int = 20
    lr: float = 1e-3
    optimizer: str = "sign"
    batch_size: int = 64
    mask_ratio: float = 0.5
    seed: int = 0


def unlearning_steps(model: nn.Module, params: Sequence[nn.Parameter], mask: dict[str, torch.Tensor] | None,
                     opts: LowerOptions, terms) -> nn.Module:
    """The lower level: `opts.steps` steps on L_MU(theta; w) = mean_j [(1 - w_j) retain_j + w_j forget_j],
    with `terms(g)` giving (retain, forget, w) of one minibatch drawn from `g`; masked if `mask`."""
    model.train()
    optimizer = make_optimizer(params, opts.optimizer, opts.lr)
    update = MaskedUpdate(model, mask).attach(optimizer) if mask is not None else None
    g = torch.Generator().manual_seed(opts.seed)  # the same batches for every w: less noise in the upper step
    for _ in range(opts.steps):
        retain, forget, sw = terms(g)
        loss = ((1 - sw) * retain + sw * forget).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if update is not None:
        update.remove()
    return model.eval()


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
            _accumulate(total, torch.autograd.grad((sample_w[sl].to(ce) * ce).sum(), params, allow_unused=True))
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


# ----------------------------------------------------------------------------- prompt target


def digits_candidates() -> tuple[list[str], list[str]]:
    """The 40 template prompts of the embedded model and their anchors (the next digit, same
    colour, as in prompts/digits.yaml)."""
    from erase.digits import COLOURS, prompt_for

    prompts = [prompt_for(d, c) for d in range(10) for c in COLOURS]
    anchors = [prompt_for((d + 1) % 10, c) for d in range(10) for c in COLOURS]
    return prompts, anchors


@dataclass
class PromptData:
    """Encoded candidate prompts and the original model's images of each (erase.sd.image_set)."""

    latents: torch.Tensor  # (N, 4, h, w)
    prompt_of: torch.Tensor  # (N,) candidate index of each image
    embeds: torch.Tensor  # (P, 77, D): c
    anchor_embeds: torch.Tensor  # (P, 77, D): c'
    uncond_embeds: torch.Tensor  # (1, 77, D): the empty prompt


def _mse_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


class PromptProblem:
    """Prompt-wise search on a Stable Diffusion UNet: items are the candidate prompts.

    Lower level (per image j of prompt p(j), the same x_t for both terms): SalUn / RL
    (SalUn Eq. 9 split per sample) w_p ||eps(x_t, c) - sg eps(x_t, c')||^2 + beta (1 - w_p)
    ||eps(x_t, c) - eps||^2, SalUn under a mask from the w-weighted Eq. 8 loss; ESD (Gandikota
    et al. 2023, Eq. 2) w_p ||eps(x_t, c) - sg[eps*(x_t) - eta (eps*(x_t, c) - eps*(x_t))]||^2 on
    its parameter subset. Upper level: each prompt's denoising loss on its own images after
    unlearning, at fixed (t, noise) draws (common random numbers across upper steps).
    """

    def __init__(self, unet: nn.Module, scheduler, data: PromptData, lower: LowerOptions, beta: float = 0.5,
                 eta: float = 1.0, guidance_scale: float = 7.5, eval_draws: int = 2, upper_loss: str = "denoising",
                 device: str | torch.device | None = None):
        from erase.objectives import ESD_TARGETS
        from erase.saliency import select_parameters

        self.unet, self.scheduler, self.data, self.opts = unet, scheduler, data, lower
        if upper_loss not in PROMPT_LOSSES:
            raise ValueError(f"unknown prompt upper loss {upper_loss!r}; choose from {', '.join(PROMPT_LOSSES)}")
        device = device if device is not None else next(unet.parameters()).device  # default: where the UNet is
        self.beta, self.eta, self.guidance_scale, self.device, self.upper_loss = beta, eta, guidance_scale, device, upper_loss
        self.num_items = len(data.embeds)
        self.counts = torch.bincount(data.prompt_of, minlength=self.num_items).double()
        if (self.counts == 0).any():
            raise ValueError("every candidate prompt needs at least one image")
        pattern = ESD_TARGETS.get(lower.method)
        self.param_names = {n for n, _ in select_parameters(unet, pattern)}
        self.frozen = copy.deepcopy(unet).to(device).requires_grad_(False).eval() if lower.method.startswith("esd") else None
        self.eval_draws = eval_draws
        self.eval_batches = self._draws(eval_draws, lower.seed + 1)

    def _noised(self, idx: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        from erase.objectives import noised

        batch = noised(self.scheduler, self.data.latents[idx.to(self.data.latents.device)], g)
        batch["idx"] = idx
        return {k: v.to(self.device) for k, v in batch.items()}

    def _draws(self, draws: int, seed: int) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        n, size = len(self.data.latents), max(1, self.opts.batch_size)
        return [self._noised(torch.arange(n)[i : i + size], g) for _ in range(draws) for i in range(0, n, size)]

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for n, p in model.named_parameters() if n in self.param_names and p.requires_grad]

    def _cond(self, batch, table: torch.Tensor) -> torch.Tensor:
        return table[self.data.prompt_of[batch["idx"].cpu()].to(table.device)].to(self.device)

    def _terms(self, unet: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(retain_j, forget_j, prediction) per image of the batch; the prediction carries the graph."""
        x, t = batch["noisy_latents"], batch["timesteps"]
        cond = self._cond(batch, self.data.embeds)
        model_pred = unet(x, t, encoder_hidden_states=cond).sample
        with torch.no_grad():
            if self.frozen is not None:
                uncond = self.data.uncond_embeds.to(self.device).expand(len(x), -1, -1)
                eps_c = self.frozen(x, t, encoder_hidden_states=cond).sample
                eps_0 = self.frozen(x, t, encoder_hidden_states=uncond).sample
                target = eps_0 - self.eta * (eps_c - eps_0)
            else:
                target = unet(x, t, encoder_hidden_states=self._cond(batch, self.data.anchor_embeds)).sample
        forget = _mse_per_sample(model_pred, target)
        if self.frozen is not None:
            return torch.zeros_like(forget), forget, model_pred
        return self.beta * _mse_per_sample(model_pred, batch["target"]), forget, model_pred

    def _mask(self, unet: nn.Module, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """SalUn Eq. 8 with per-prompt weights: |grad sum_j w_p(j) MSE(eps_cfg, eps)|, top ratio."""

        def loss_fn(m, batch):
            x, t = batch["noisy_latents"], batch["timesteps"]
            uncond = self.data.uncond_embeds.to(self.device).expand(len(x), -1, -1)
            cond = torch.cat([self._cond(batch, self.data.embeds), uncond])
            pred = m(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=cond).sample
            eps_c, eps_0 = pred.chunk(2)
            eps_cfg = (1 + self.guidance_scale) * eps_c - self.guidance_scale * eps_0
            sw = w[self.data.prompt_of[batch["idx"].cpu()]].to(eps_cfg)
            return -(sw * _mse_per_sample(eps_cfg, batch["noise"])).sum()

        return compute_saliency_mask(unet, loss_fn, self.eval_batches, self.opts.mask_ratio, show_progress=False)

    def lower(self, w: torch.Tensor) -> nn.Module:
        opts = self.opts
        unet = copy.deepcopy(self.unet).to(self.device)
        for n, p in unet.named_parameters():
            p.requires_grad_(n in self.param_names)
        mask = self._mask(unet, w) if opts.method == "salun" else None
        if mask is not None:
            mask = {n: m for n, m in mask.items() if n in self.param_names}
        pw = w.float()

        def terms(g: torch.Generator):
            batch = self._noised(torch.randint(0, len(self.data.latents), (opts.batch_size,), generator=g), g)
            retain, forget, _ = self._terms(unet, batch)
            return retain, forget, pw[self.data.prompt_of[batch["idx"].cpu()]].to(forget)

        return unlearning_steps(unet, self.trainable(unet), mask, opts, terms)

    def _per_image(self, unet: nn.Module, fn) -> torch.Tensor:
        """Mean over the eval draws of fn(batch) per image, (N,)."""
        total = torch.zeros(len(self.data.latents), dtype=torch.float64)
        for batch in self.eval_batches:
            total.index_add_(0, batch["idx"].cpu(), fn(batch).detach().double().cpu())
        return total / self.eval_draws

    def _by_prompt(self, per_image: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.num_items, dtype=torch.float64).index_add_(0, self.data.prompt_of, per_image)

    def _denoising(self, unet: nn.Module, batch) -> torch.Tensor:
        """The upper-level forget loss per image (see `upper_loss`)."""
        x, t = batch["noisy_latents"], batch["timesteps"]
        pred = unet(x, t, encoder_hidden_states=self._cond(batch, self.data.embeds)).sample
        loss = _mse_per_sample(pred, batch["target"])
        if self.upper_loss == "contrast":  # minus the same loss under the anchor (ESD: the empty prompt)
            if self.frozen is not None:
                reference = self.data.uncond_embeds.to(self.device).expand(len(x), -1, -1)
            else:
                reference = self._cond(batch, self.data.anchor_embeds)
            loss = loss - _mse_per_sample(unet(x, t, encoder_hidden_states=reference).sample, batch["target"])
        return loss

    @torch.no_grad()
    def item_losses(self, unet: nn.Module) -> torch.Tensor:
        unet.eval()
        return self._by_prompt(self._per_image(unet, lambda b: self._denoising(unet, b))) / self.counts

    def upper_gradient(self, unet: nn.Module, w: torch.Tensor) -> list[torch.Tensor]:
        unet.eval()
        params = self.trainable(unet)
        total = [torch.zeros_like(p) for p in params]
        per_image_w = (w / self.counts)[self.data.prompt_of].float() / self.eval_draws  # as in item_losses
        for batch in self.eval_batches:
            loss = (per_image_w[batch["idx"].cpu()].to(self.device) * self._denoising(unet, batch)).sum()
            _accumulate(total, torch.autograd.grad(loss, params, allow_unused=True))
        return total

    @torch.no_grad()
    def lower_partials(self, unet: nn.Module) -> torch.Tensor:
        unet.eval()

        def diff(batch):
            retain, forget, _ = self._terms(unet, batch)
            return forget - retain

        return self._by_prompt(self._per_image(unet, diff)) / len(self.data.latents)


def prepare_prompt_data(pipe, prompts: Sequence[str], anchors: Sequence[str], images_per_prompt: int,
                        generation_steps: int, guidance_scale: float, cache_dir: str, resolution: int | None = None) -> PromptData:
    """Generate (or reuse from the cache) `images_per_prompt` images per candidate and encode everything."""
    from erase.sd import encode_images, encode_prompts, image_set

    images, chosen = image_set(pipe, list(prompts), images_per_prompt * len(prompts), 0, generation_steps,
                               guidance_scale, os.path.join(cache_dir, "images"), resolution)
    index = {p: i for i, p in enumerate(prompts)}
    return PromptData(
        latents=encode_images(pipe, images),
        prompt_of=torch.tensor([index[p] for p in chosen]),
        embeds=encode_prompts(pipe, list(prompts)),
        anchor_embeds=encode_prompts(pipe, list(anchors)),
        uncond_embeds=encode_prompts(pipe, [""]),
    )


# ----------------------------------------------------------------------------- command


@dataclass
class WorstCaseConfig:
    """Options of `python -m erase.worst_case`."""

    target: str = field(default="data", metadata={"help": "data (training samples), class, or prompt (Stable Diffusion)"})
    size: str = field(default="0.1", metadata={"help": "a fraction of the candidates in (0, 1), or a count K"})
    method: str = field(default="rl", metadata={
        "help": "unlearning method of the lower level: ft, rl, ga, salun (data, class); salun, rl, esd-x, esd-u (prompt)"})
    dataset: str = field(default="digits", metadata={"help": "data/class: digits (offline) or cifar10 (hub)"})
    label_noise: float = field(default=0.0, metadata={
        "help": "data/class: fraction of training labels flipped to a random other class, in [0, 1)"})
    model: str = field(default="digits", metadata={"help": "prompt: pipeline folder, hub id, or digits"})
    prompts: str | None = field(default=None, metadata={
        "help": "prompt: JSON file of [prompt, anchor] pairs (default: the 40 digits prompts)"})
    outer_steps: int = field(default=20, metadata={"help": "upper-level steps"})
    w_lr: float = field(default=0.1, metadata={"help": "upper step size on the normalised gradient"})
    gamma: float = field(default=1e-4, metadata={"help": "weight of gamma * ||w||^2"})
    hypergradient: str = field(default="direct", metadata={"help": "direct (paper) or unrolled (+ one-step implicit term)"})
    unroll_lr: float = field(default=0.005, metadata={"help": "eta of the unrolled last lower step"})
    inner_steps: int | None = field(default=None, metadata={"help": "lower-level steps per upper step (default: 20 data/class, 10 prompt)"})
    inner_lr: float | None = field(default=None, metadata={
        "help": "lower-level learning rate (default: 1e-3 data/class sign-SGD, 1e-4 prompt Adam)"})
    inner_optimizer: str | None = field(default=None, metadata={
        "help": "sign (sign-SGD, the paper's) or adam (default: sign data/class, adam prompt)"})
    batch_size: int | None = field(default=None, metadata={"help": "lower-level batch size (default: 64 data/class, 16 prompt)"})
    mask_ratio: float = field(default=0.5, metadata={"help": "SalUn: fraction of weights the lower level may update"})
    train_epochs: int = field(default=30, metadata={"help": "data/class: epochs of the original model"})
    train_lr: float = field(default=0.05, metadata={"help": "data/class: learning rate of the original model"})
    images_per_prompt: int = field(default=4, metadata={"help": "prompt: images of each candidate from the original model"})
    generation_steps: int | None = field(default=None, metadata={"help": "prompt: sampler steps for those images (default: the model's)"})
    guidance_scale: float | None = field(default=None, metadata={"help": "prompt: guidance for those images (default: the model's)"})
    beta: float = field(default=0.5, metadata={"help": "prompt salun/rl: weight of the retain loss (SalUn Eq. 9)"})
    eval_draws: int = field(default=1, metadata={"help": "prompt: (t, noise) draws per image for the upper loss"})
    prompt_loss: str = field(default="denoising", metadata={
        "help": "prompt upper loss: denoising (the paper's) or contrast (minus the anchor's denoising loss)"})
    cache_dir: str = field(default=os.path.join(os.path.expanduser("~"), ".cache", "erase"), metadata={"help": "prompt: generated image sets"})
    seed: int = field(default=0, metadata={"help": "data split, random start, lower-level batches"})

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose from {', '.join(TARGETS)}")
        methods = PROMPT_METHODS if self.target == "prompt" else CLASSIFIER_METHODS
        if self.method not in methods:
            raise ValueError(f"method {self.method!r} does not apply to target {self.target}; choose from {', '.join(methods)}")
        if self.target != "prompt" and self.dataset not in ("digits", "cifar10"):
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from digits, cifar10")
        prompt = self.target == "prompt"
        self.inner_lr = self.inner_lr if self.inner_lr is not None else (1e-4 if prompt else 1e-3)
        self.inner_optimizer = self.inner_optimizer or ("adam" if prompt else "sign")
        self.inner_steps = self.inner_steps if self.inner_steps is not None else (10 if prompt else 20)
        self.batch_size = self.batch_size if self.batch_size is not None else (16 if prompt else 64)
        if self.prompt_loss not in PROMPT_LOSSES:
            raise ValueError(f"unknown prompt_loss {self.prompt_loss!r}; choose from {', '.join(PROMPT_LOSSES)}")
        if self.inner_optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown inner optimizer {self.inner_optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        check_ratio(self.mask_ratio)
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        positive = {"inner_steps": self.inner_steps, "inner_lr": self.inner_lr, "batch_size": self.batch_size,
                    "train_epochs": self.train_epochs, "train_lr": self.train_lr, "images_per_prompt": self.images_per_prompt,
                    "eval_draws": self.eval_draws}
        bad = [k for k, v in positive.items() if not v > 0]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be > 0")
        self.search_options(show_progress=False)  # validates outer_steps, w_lr, gamma, hypergradient

    def search_options(self, show_progress: bool = True) -> SearchOptions:
        return SearchOptions(self.outer_steps, self.w_lr, self.gamma, self.hypergradient, self.unroll_lr, show_progress=show_progress)

    def lower_options(self) -> LowerOptions:
        return LowerOptions(self.method, self.inner_steps, self.inner_lr, self.inner_optimizer, self.batch_size, self.mask_ratio, self.seed)


def random_start(n: int, m: int, seed: int) -> torch.Tensor:
    """The 0/1 indicator of a random m-subset: the reference code's start (a random forget set)."""
    w = torch.zeros(n, dtype=torch.float64)
    w[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]] = 1
    return w


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
    return _report(cfg, result, m, problem.num_items, indices=indices, seconds_original=seconds_original,
                   note=f"indices into the training split of load_dataset({cfg.dataset!r}, seed={cfg.seed}, "
                        f"label_noise={cfg.label_noise}); use them with the same --seed and --label-noise")


def load_candidates(path: str | None) -> tuple[list[str], list[str]]:
    """[prompt, anchor] pairs (or bare prompts, anchored to the empty prompt) from a JSON file."""
    if path is None:
        return digits_candidates()
    try:
        with open(path) as f:
            items = json.load(f)
        pairs = [(it, "") if isinstance(it, str) else (str(it[0]), str(it[1])) for it in items]
    except (OSError, ValueError, TypeError, IndexError, KeyError) as err:
        raise ValueError(f"cannot read candidate prompts from {path}: expected a JSON list of [prompt, anchor] pairs ({err})") from err
    if len(pairs) < 2 or len({p for p, _ in pairs}) != len(pairs):
        raise ValueError(f"{path} must list at least two distinct candidate prompts")
    return [p for p, _ in pairs], [a for _, a in pairs]


def model_defaults(model: str) -> tuple[int, float]:
    """(sampler steps, guidance) for generating the candidates' images."""
    if model == "digits":
        from erase.digits import DEFAULT_GUIDANCE, DEFAULT_STEPS

        return DEFAULT_STEPS, DEFAULT_GUIDANCE
    return 50, 7.5


def build_prompt_problem(cfg: WorstCaseConfig, pipe, prompts: Sequence[str], anchors: Sequence[str],
                         device: str | torch.device | None = None) -> PromptProblem:
    """The prompt-wise problem on `pipe`'s UNet, on `device` (default: the pipeline's)."""
    from diffusers import DDPMScheduler

    steps, guidance = model_defaults(cfg.model)
    data = prepare_prompt_data(pipe, prompts, anchors, cfg.images_per_prompt, cfg.generation_steps or steps,
                               cfg.guidance_scale if cfg.guidance_scale is not None else guidance, cfg.cache_dir)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    return PromptProblem(pipe.unet, scheduler, data, cfg.lower_options(), beta=cfg.beta, eval_draws=cfg.eval_draws,
                         upper_loss=cfg.prompt_loss, device=device)


def run_prompt(cfg: WorstCaseConfig, device: str | torch.device = "cpu", show_progress: bool = True) -> dict:
    """Prompt-wise search on a Stable Diffusion pipeline."""
    prompts, anchors = load_candidates(cfg.prompts)
    m = resolve_size(cfg.size, len(prompts))  # fail before loading anything
    _quiet_libraries()
    from erase.sd import load_pipeline

    pipe = load_pipeline(cfg.model, device=device)
    start = time.perf_counter()
    problem = build_prompt_problem(cfg, pipe, prompts, anchors, device)
    seconds_data = time.perf_counter() - start
    result = search(problem, m, cfg.search_options(show_progress), random_start(len(prompts), m, cfg.seed))
    return _report(cfg, result, m, len(prompts), prompts=[prompts[i] for i in result.selected],
                   start_prompts=[prompts[i] for i in result.start], anchors=[anchors[i] for i in result.selected],
                   seconds_data=seconds_data)


def _quiet_libraries() -> None:
    """Keep stderr to progress bars and real problems (as erase/train.py does)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()


def _report(cfg: WorstCaseConfig, result: SearchResult, m: int, n: int, **extra) -> dict:
    return {"config": asdict(cfg), "size": m, "candidates": n, **asdict(result), **extra, "torch": torch.__version__}


def run(cfg: WorstCaseConfig, device: str | torch.device = "cpu", show_progress: bool = True) -> dict:
    if cfg.target == "prompt":
        return run_prompt(cfg, device, show_progress)
    return run_classifier(cfg, device, show_progress=show_progress)


def _one_line_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: Sequence[str] | None = None) -> tuple[WorstCaseConfig, str, str | None]:
    parser = argparse.ArgumentParser(prog="python -m erase.worst_case", description=__doc__.split("\n\n")[0])
    parser.error = _one_line_error  # bad input: one line on stderr, exit status 2
    for f in fields(WorstCaseConfig):
        kind = {"int": int, "float": float, "float | None": float, "int | None": int}.get(str(f.type), str)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=f.metadata.get("help"))
    parser.add_argument("--out", required=True, help="JSON list: training indices (data, class; a valid indices: file) or prompts")
    parser.add_argument("--report", default=None, help="optional JSON with w, the search history, timings and settings")
    args = vars(parser.parse_args(argv))
    out, report = args.pop("out"), args.pop("report")
    return WorstCaseConfig(**args), out, report


def main(argv: Sequence[str] | None = None) -> int:
    from erase.atomic import write_json

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, out, report_path = parse_args(argv)
        report = run(cfg)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    selected = report["prompts"] if cfg.target == "prompt" else report["indices"]
    write_json(selected, out)
    if report_path:
        write_json(report, report_path)
    moved = 1 - report["history"][-1]["overlap_with_start"] if report["history"] else 0.0
    print(f"worst-case {cfg.target} set: {report['size']} of {report['candidates']} items, {moved:.0%} changed from the "
          f"random start, {report['seconds']:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
