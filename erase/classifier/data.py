"""Classifier data: scikit-learn digits or CIFAR-10, label noise, forget-set specs, random wrong labels."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch

logger = logging.getLogger(__name__)


DATASETS = ("digits", "cifar10")
NOISE_SEED_OFFSET = 1000  # label-noise draws must not reuse the forget set's random stream


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


def random_wrong_labels(y: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (y + torch.randint(1, num_classes, y.shape, generator=g)) % num_classes

