"""Machine unlearning for image classifiers: SalUn and the baselines, on the shared masking core.

SalUn for classification (Fan et al., ICLR 2024, Sec. 4): the saliency mask comes from the
cross-entropy of the forget set with its true labels; unlearning then fine-tunes only the
salient weights on the forget set relabelled with random wrong labels plus the retain set
with its true labels ("random labelling", RL). Baselines: Retrain (train from scratch on the
retain set, the gold standard), FT (fine-tune on the retain set), GA (gradient ascent on the
forget set), RL (random labelling without the mask) and l1-sparse (FT with a decaying l1
penalty, Jia et al. 2023). Metrics: UA = 100 - forget accuracy, RA, TA and MIA-efficacy.
Data: scikit-learn digits or CIFAR-10, optionally with a fraction of the training labels
flipped (`--label-noise`, `with_label_noise`).

    python -m erase.classifier --dataset digits --forget random:0.1 --method salun --out r.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from erase.atomic import write_json
from erase.cli import (
    add_dataclass_arguments,
    check_positive,
    check_writable,
    one_line_errors,
    run_command,
)
from erase.saliency import MaskedUpdate, check_ratio, compute_saliency_mask

logger = logging.getLogger(__name__)

METHODS = ("retrain", "ft", "ga", "rl", "l1-sparse", "salun")
DATASETS = ("digits", "cifar10")
# learning rates chosen by bench/classifier.py's search on a held-out seed (digits, random:0.1)
DEFAULT_LR = {"retrain": 0.05, "ft": 0.05, "ga": 0.001, "rl": 0.01, "l1-sparse": 0.05, "salun": 0.01}
NOISE_SEED_OFFSET = 1000  # label-noise draws must not reuse the forget set's random stream


# ----------------------------------------------------------------------------- data


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor  # (N, C, H, W) float in [0, 1]
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    # training samples whose label `with_label_noise` flipped (they are trained and scored on the flipped label)
    mislabeled: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))


def load_dataset(name: str, seed: int = 0, label_noise: float = 0.0) -> Dataset:
    """scikit-learn digits (offline, 8x8 grey, 80/20 stratified split) or CIFAR-10 (hub), with
    `label_noise` of the training labels flipped (`with_label_noise`)."""
    if not 0 <= label_noise < 1:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(digits.target, dtype=torch.int64)
        tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=digits.target)
        data = Dataset(name, x[tr], y[tr], x[te], y[te], 10)
    elif name == "cifar10":
        data = _load_cifar10()
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return with_label_noise(data, label_noise, seed) if label_noise else data


def with_label_noise(data: Dataset, fraction: float, seed: int) -> Dataset:
    """Symmetric label noise: a random `fraction` of the training labels is replaced by a random
    other class; the test labels stay true. The original model fits the flipped samples only by
    memorising them, as a CIFAR-10 ResNet memorises its atypical samples (Feldman and Zhang
    2020); clean digits has almost none (Retrain forgets about 1% of a random forget set), so
    this is the digits regime in which fine-tuning can forget anything at all. The draw uses
    its own generator (seed + NOISE_SEED_OFFSET), independent of `parse_forget`'s."""
    g = torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET)
    flipped = torch.randperm(len(data.train_y), generator=g)[: round(fraction * len(data.train_y))].sort().values
    train_y = data.train_y.clone()
    train_y[flipped] = random_wrong_labels(train_y[flipped], data.num_classes, seed + NOISE_SEED_OFFSET)
    return replace(data, name=f"{data.name}+noise{fraction:g}", train_y=train_y, mislabeled=flipped)


def _load_cifar10() -> Dataset:
    try:
        import datasets as hf_datasets
    except ImportError as err:
        raise RuntimeError("cifar10 needs the `datasets` library: pip install datasets") from err
    try:
        ds = hf_datasets.load_dataset("uoft-cs/cifar10")
    except Exception as err:  # offline: ConnectionError, LocalEntryNotFoundError, ...
        raise RuntimeError(f"cifar10 could not be loaded from the Hugging Face hub (offline?): {type(err).__name__}") from err

    def to_tensors(split):
        x = np.stack([np.asarray(im, dtype=np.uint8) for im in split["img"]])
        return torch.tensor(x).permute(0, 3, 1, 2).float() / 255.0, torch.tensor(split["label"])

    train_x, train_y = to_tensors(ds["train"])
    test_x, test_y = to_tensors(ds["test"])
    return Dataset("cifar10", train_x, train_y, test_x, test_y, 10)


def check_forget_spec(spec: str) -> None:
    """The form of a forget spec, checked before any data is loaded (parse_forget checks the rest)."""
    kind, _, arg = spec.partition(":")
    fraction_ok = kind != "random" or (arg.replace(".", "", 1).isdigit() and 0 < float(arg) < 1)
    if kind not in ("random", "class", "indices") or not arg or not fraction_ok:
        raise ValueError(f"cannot parse forget set {spec!r}: use random:FRACTION (0<F<1), class:K, or indices:FILE.json")
    if kind == "indices" and not os.path.isfile(arg):
        raise ValueError(f"forget indices file not found: {arg}")


def parse_forget(spec: str, train_y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Indices into the training set: `random:FRACTION`, `class:K` or `indices:FILE.json`."""
    kind, _, arg = spec.partition(":")
    n = len(train_y)
    try:
        if kind == "random":
            frac = float(arg)
            if not 0 < frac < 1:
                raise ValueError
            g = torch.Generator().manual_seed(seed)
            return torch.randperm(n, generator=g)[: round(frac * n)].sort().values
        if kind == "class":
            k = int(arg)
            idx = torch.nonzero(train_y == k).flatten()
            if len(idx) == 0:
                raise ValueError
            return idx
        if kind == "indices":
            with open(arg) as f:
                idx = torch.tensor(sorted(set(json.load(f))), dtype=torch.int64)
            if len(idx) == 0 or idx.min() < 0 or idx.max() >= n:
                raise ValueError
            return idx
    except (ValueError, OSError, TypeError):
        pass
    raise ValueError(
        f"cannot parse forget set {spec!r}: use random:FRACTION (0<F<1), class:K, or indices:FILE.json "
        f"with indices in [0, {n})"
    )


# ----------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet (He et al. 2016): a 3x3 stem and one BasicBlock per stage."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))  # (B, C, H', W')
        return self.fc(h.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------- training


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


def mia_efficacy(model: nn.Module, retain, test, forget, device: str | torch.device = "cpu", seed: int = 0) -> float:
    """An SVM on the true-class confidence learns members (retain) vs non-members (test);
    MIA-efficacy is the percentage of forget samples it calls non-members (Jia et al. 2023)."""
    from sklearn.svm import SVC

    def confidence(x, y):
        return predict_proba(model, x, device).gather(1, y[:, None]).numpy()

    g = torch.Generator().manual_seed(seed)
    members = torch.randperm(len(retain[1]), generator=g)[: len(test[1])]  # balanced classes
    feats = np.concatenate([confidence(retain[0][members], retain[1][members]), confidence(*test)])
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(test[1]))])
    svm = SVC(C=3, gamma="auto", kernel="rbf").fit(feats, labels)
    return 100.0 * float((svm.predict(confidence(*forget)) == 0).mean())


def evaluate(model: nn.Module, data: Dataset, forget_idx: torch.Tensor, device: str | torch.device = "cpu") -> dict[str, float]:
    keep = torch.ones(len(data.train_y), dtype=torch.bool)
    keep[forget_idx] = False
    forget = (data.train_x[forget_idx], data.train_y[forget_idx])
    retain = (data.train_x[keep], data.train_y[keep])
    test = (data.test_x, data.test_y)
    return {
        "UA": 100.0 - accuracy(model, *forget, device),
        "RA": accuracy(model, *retain, device),
        "TA": accuracy(model, *test, device),
        "MIA": mia_efficacy(model, retain, test, forget, device),
    }


def random_wrong_labels(y: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (y + torch.randint(1, num_classes, y.shape, generator=g)) % num_classes


# ----------------------------------------------------------------------------- unlearning


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


def main(argv: list[str] | None = None) -> int:
    parser = one_line_errors(argparse.ArgumentParser(prog="python -m erase.classifier", description=__doc__.split("\n\n")[0]))
    add_dataclass_arguments(parser, UnlearnConfig)
    parser.add_argument("--out", required=True, help="JSON report path")
    logging.basicConfig(level=logging.WARNING)

    def check() -> tuple[UnlearnConfig, str]:
        args = vars(parser.parse_args(argv))
        out = args.pop("out")
        check_writable(out, "report")
        return UnlearnConfig(**args), out

    return run_command(check, lambda checked: unlearn_and_write(*checked))


def unlearn_and_write(cfg: UnlearnConfig, out: str) -> None:
    report = run(cfg)
    write_json(report, out)
    m = report["metrics"]
    noisy = f", {report['forget_mislabeled']} of {report['forget_size']} forget labels flipped" if cfg.label_noise else ""
    print(f"{cfg.method}: UA {m['UA']:.2f}  RA {m['RA']:.2f}  TA {m['TA']:.2f}  MIA {m['MIA']:.2f}  "
          f"({report['seconds']:.1f} s{noisy}) -> {out}")


if __name__ == "__main__":
    sys.exit(main())
