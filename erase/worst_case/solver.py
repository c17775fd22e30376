"""The bi-level solver: projection onto the capped simplex, the lower-level loop, the
hypergradient and the upper-level search (see the package docstring for the algorithm)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from erase.saliency import MaskedUpdate

logger = logging.getLogger("erase.worst_case")

HYPERGRADIENTS = ("direct", "unrolled")
OPTIMIZERS = ("sign", "adam")


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


def accumulate(total: list[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
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
