"""Unlearning metrics: UA, RA, TA and MIA-efficacy (an SVM on true-class confidence)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from erase.classifier.data import Dataset
from erase.classifier.training import accuracy, predict_proba

logger = logging.getLogger(__name__)


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
