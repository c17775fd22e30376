"""Options of `python -m erase.worst_case` (one dataclass), the random start, the report."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

from erase.command import check_model, check_positive, check_writable
from erase.saliency import check_ratio
from erase.worst_case.solver import (
    OPTIMIZERS,
    LowerOptions,
    SearchOptions,
    SearchResult,
)

TARGETS = ("data", "class", "prompt")
CLASSIFIER_METHODS = ("ft", "rl", "ga", "salun")
PROMPT_METHODS = ("salun", "rl", "esd-x", "esd-u")
PROMPT_LOSSES = ("denoising", "contrast")


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
        check_size(self.size)
        check_positive(generation_steps=self.generation_steps)
        if min(self.beta, self.guidance_scale or 0) < 0:
            raise ValueError("beta and guidance_scale must be >= 0")
        if prompt:
            check_model(self.model)
            if self.prompts is not None and not os.path.isfile(self.prompts):
                raise ValueError(f"cannot read candidate prompts from {self.prompts}: no such file")
            check_writable(self.cache_dir, "cache", folder=True)

    def search_options(self, show_progress: bool = True) -> SearchOptions:
        return SearchOptions(self.outer_steps, self.w_lr, self.gamma, self.hypergradient, self.unroll_lr, show_progress=show_progress)

    def lower_options(self) -> LowerOptions:
        return LowerOptions(self.method, self.inner_steps, self.inner_lr, self.inner_optimizer, self.batch_size, self.mask_ratio, self.seed)


def check_size(size: str) -> None:
    """The form of --size, before anything is loaded: a fraction in (0, 1) or a whole count >= 1."""
    try:
        value = float(size)
    except ValueError:
        value = float("nan")
    whole = size.strip().isdigit()
    if not ((0 < value < 1 and not whole) or (whole and value >= 1)):
        raise ValueError(f"--size {size!r} must be a fraction in (0, 1) or a whole count K >= 1")


def random_start(n: int, m: int, seed: int) -> torch.Tensor:
    """The 0/1 indicator of a random m-subset: the reference code's start (a random forget set)."""
    w = torch.zeros(n, dtype=torch.float64)
    w[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]] = 1
    return w


def report(cfg: WorstCaseConfig, result: SearchResult, m: int, n: int, **extra) -> dict:
    return {"config": asdict(cfg), "size": m, "candidates": n, **asdict(result), **extra, "torch": torch.__version__}
