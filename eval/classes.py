"""Class accuracy of generated images: does "a red handwritten digit seven" still draw a seven?

For every class prompt the model generates N images; a classifier judges them and
`accuracy[class]` is the fraction judged to be that class. After erasing a class its
accuracy should fall while the others stay. Classifiers:

* `digits` - the embedded digits model's held-out classifier (erase/digits/judge.py), two heads:
  the digit (`accuracy`, per digit word) and the colour (`colour_accuracy`, per colour);
* `imagenette` - an ImageNet ResNet-50 through transformers (`microsoft/resnet-50`, needs
  the hub or a local copy): top-1 over the 1,000 ImageNet classes must be the ImageNet index
  of the Imagenette class;
* anything else from Python: build a `ClassTask` with your own `predict`.

    python -m eval classes --model digits --images-per-prompt 10 --out classes.json
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchmetrics import Metric

from erase.defaults import RESNET_ID
from eval.generate import Generated, Sample
from eval.stats import rate

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENETTE_CLASSES",
    "ClassAccuracy",
    "ClassTask",
    "class_of",
    "class_samples",
    "digits_task",
    "evaluate_classes",
    "imagenette_task",
    "load_task",
    "strict_digits_task",
    "per_class_counts",
    "summarise",
]

# Imagenette class -> its ImageNet-1k index
IMAGENETTE_CLASSES = {
    "tench": 0, "English springer": 217, "cassette player": 482, "chain saw": 491, "church": 497,
    "French horn": 566, "garbage truck": 569, "gas pump": 571, "golf ball": 574, "parachute": 701,
}
IMAGENETTE_TEMPLATE = "an image of {name}"  # the forget prompts of prompts/imagenette.yaml (SalUn)


# ----------------------------------------------------------------------------- the formula


def per_class_counts(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, total) per target class, each (num_classes,) int64; a wrong or -1 prediction counts as a miss."""
    preds, target = preds.long().reshape(-1).to(target.device), target.long().reshape(-1)
    total = torch.bincount(target, minlength=num_classes)
    correct = torch.bincount(target[preds == target], minlength=num_classes)
    return correct, total


class ClassAccuracy(Metric):
    """Running per-class accuracy: `update(preds, target)`, `compute()` -> {class: fraction, ...} and overall."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, class_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.class_names = list(class_names)
        self.add_state("correct", torch.zeros(len(self.class_names), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(len(self.class_names), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        correct, total = per_class_counts(preds.to(self.device), target.to(self.device), len(self.class_names))
        self.correct += correct
        self.total += total

    def compute(self) -> dict:
        """{"per_class": {name: fraction} for classes seen, "overall": fraction of all images}."""
        per_class = {n: int(c) / int(t) for n, c, t in zip(self.class_names, self.correct, self.total, strict=True)
                     if t > 0}
        return {"per_class": per_class, "overall": int(self.correct.sum()) / max(1, int(self.total.sum()))}


# ----------------------------------------------------------------------------- tasks


@dataclass
class ClassTask:
    """What class accuracy needs: class names per head (the first is the main one), the prompts
    with the class index each head should see, and `predict(images) -> {head: (B,) indices}`."""

    name: str
    heads: dict[str, list[str]]
    prompts: list[tuple[str, dict[str, int]]]
    predict: Callable[[list[Image.Image]], dict[str, torch.Tensor]]


def digits_task(classifier: torch.nn.Module) -> ClassTask:
    """Every digit in every colour ("a red handwritten digit seven"), judged by `classifier`."""
    from erase.digits import COLOURS, DIGIT_WORDS, classify_images, prompt_for

    prompts = [(prompt_for(d, colour), {"digit": d, "colour": c})
               for d in range(len(DIGIT_WORDS)) for c, colour in enumerate(COLOURS)]

    def predict(images: list[Image.Image]) -> dict[str, torch.Tensor]:
        digit, colour = classify_images(images, classifier)
        return {"digit": digit, "colour": colour}

    return ClassTask("digits", {"digit": list(DIGIT_WORDS), "colour": list(COLOURS)}, prompts, predict)


def strict_digits_task() -> ClassTask:
    """The digits task judged strictly, by a judge that never saw a generated or augmented image: a
    logistic regression on scikit-learn's raw 8x8 digits (the classifier split, i % 10 in 5..8), reading
    each image as such a digit (its brightest channel, averaged down to 8x8, scaled to 0..16 by its own
    maximum); the colour is the one whose RGB is nearest (cosine) to the mean colour of the image's bright
    pixels. The project's CNN was trained with shifts, tints and noise so that generated digits are
    judged fairly; degraded digits it forgives, this judge does not."""
    import numpy as np
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from erase.digits import COLOURS, DIGIT_WORDS, prompt_for
    from erase.digits.data import SPLITS
    from erase.digits.prompts import COLOUR_RGB

    data = load_digits()
    keep = np.isin(np.arange(len(data.target)) % 10, list(SPLITS["classifier"]))
    digits = LogisticRegression(max_iter=2000).fit(data.images[keep].reshape(-1, 64), data.target[keep])
    palette = F.normalize(torch.tensor([COLOUR_RGB[c] for c in COLOURS]), dim=1)
    prompts = [(prompt_for(d, colour), {"digit": d, "colour": c})
               for d in range(len(DIGIT_WORDS)) for c, colour in enumerate(COLOURS)]

    def predict(images: list[Image.Image]) -> dict[str, torch.Tensor]:
        rgb = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1) for im in images])
        grey = rgb.amax(1, keepdim=True)
        small = F.adaptive_avg_pool2d(grey, 8).flatten(1)
        small = 16 * small / small.amax(1, keepdim=True).clamp_min(1e-6)
        bright = (grey >= 0.5 * grey.flatten(1).amax(1)[:, None, None, None]).float()
        mean = (rgb * bright).sum((2, 3)) / bright.sum((2, 3)).clamp_min(1)
        colour = (F.normalize(mean, dim=1) @ palette.T).argmax(1)
        return {"digit": torch.from_numpy(digits.predict(small.numpy())).long(), "colour": colour}

    return ClassTask("digits-strict", {"digit": list(DIGIT_WORDS), "colour": list(COLOURS)}, prompts, predict)


def imagenette_task(model: torch.nn.Module, processor, template: str = IMAGENETTE_TEMPLATE) -> ClassTask:
    """The ten Imagenette classes; `model` is an ImageNet-1k classifier (transformers) and
    `processor` its image processor. A top-1 outside the ten classes is a miss (-1)."""
    names = list(IMAGENETTE_CLASSES)
    to_local = {imagenet: i for i, imagenet in enumerate(IMAGENETTE_CLASSES.values())}

    @torch.no_grad()
    def predict(images: list[Image.Image]) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        top1 = model(pixel_values=pixels).logits.argmax(-1).cpu().tolist()
        return {"class": torch.tensor([to_local.get(i, -1) for i in top1])}

    prompts = [(template.format(name=n), {"class": i}) for i, n in enumerate(names)]
    return ClassTask("imagenette", {"class": names}, prompts, predict)


def load_task(name: str, device: str | torch.device = "cpu", classifier_model: str = RESNET_ID,
              template: str = IMAGENETTE_TEMPLATE) -> ClassTask:
    """The `digits`, `digits-strict` or `imagenette` task with its classifier loaded; a ValueError when it cannot be."""
    if name == "digits":
        from erase.digits import load_digits_classifier

        return digits_task(load_digits_classifier(device=device))
    if name == "digits-strict":
        return strict_digits_task()
    if name == "imagenette":
        return imagenette_task(*_load_resnet(classifier_model, device), template=template)
    raise ValueError(f"unknown classifier {name!r}; choose digits, digits-strict or imagenette")


def _load_resnet(name_or_path: str, device) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
        model = AutoModelForImageClassification.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the ImageNet classifier {name_or_path!r} (offline? pass a local copy "
                         f"with --classifier-model): {err}".splitlines()[0]) from err
    if model.config.num_labels != 1000:
        raise ValueError(f"{name_or_path} has {model.config.num_labels} labels, not the 1,000 ImageNet classes")
    return model.to(device).eval(), processor


def class_of(task: ClassTask, target: dict) -> tuple[str, int] | None:
    """The (head, class index) of the task that a concept's `target` names ({"digit": 7},
    {"colour": "red"}, {"class": "tench", ...}): a class index or a class name; None if none does."""
    for head, value in target.items():
        if head not in task.heads:
            continue
        names = task.heads[head]
        index = value if isinstance(value, int) else names.index(value) if value in names else None
        if index is not None and 0 <= index < len(names):
            return head, index
    return None


def class_samples(task: ClassTask, images_per_prompt: int, guidance_scale: float, seed: int = 0) -> list[Sample]:
    """N samples per class prompt; image k of prompt p uses seed `seed + p * N + k`."""
    samples = []
    for p, (prompt, labels) in enumerate(task.prompts):
        for k in range(images_per_prompt):
            samples.append(Sample(len(samples), prompt, seed + p * images_per_prompt + k, guidance_scale, dict(labels)))
    return samples


# ----------------------------------------------------------------------------- reports


def summarise(task: ClassTask, scored: Sequence[Generated]) -> dict:
    """Per-head accuracy from samples (their labels are the targets) and predictions (g.result).

    The first head gives `accuracy` and `overall_accuracy`; another head H gives
    `H_accuracy`, `overall_H_accuracy` and `accuracy_by_H`, the first head's accuracy within
    each H class (for digits: `colour_accuracy`, and digit accuracy per colour)."""
    heads = list(task.heads)
    main_correct = [g.result[heads[0]] == g.sample.labels[heads[0]] for g in scored]
    out: dict = {}
    for h, head in enumerate(heads):
        # every process already holds all results: no sync (it would gather CPU states, which NCCL cannot)
        metric = ClassAccuracy(task.heads[head], sync_on_compute=False)
        preds, target = [g.result[head] for g in scored], [g.sample.labels[head] for g in scored]
        metric.update(torch.tensor(preds), torch.tensor(target))
        result = metric.compute()
        key = "accuracy" if h == 0 else f"{head}_accuracy"
        out[key], out[f"overall_{key}"] = result["per_class"], result["overall"]
        # each rate with its count, n and 95% interval (eval/stats.py)
        hits = [p == t for p, t in zip(preds, target, strict=True)]
        out[f"{key}_rates"] = {name: rate(sum(c for c, t in zip(hits, target) if t == i), target.count(i))
                               for i, name in enumerate(task.heads[head]) if i in target} | {"overall": rate(sum(hits), len(hits))}
        if h > 0:
            out[f"accuracy_by_{head}"] = _grouped(main_correct, [g.sample.labels[head] for g in scored],
                                                  task.heads[head])
    out["num_images"] = len(scored)
    return out


def _grouped(correct: Sequence[bool], groups: Sequence[int], names: Sequence[str]) -> dict[str, float]:
    """Fraction correct within each group (a class of another head) that has images."""
    out = {}
    for i, name in enumerate(names):
        member = [c for c, g in zip(correct, groups, strict=True) if g == i]
        if member:
            out[name] = sum(member) / len(member)
    return out


def evaluate_classes(pipe, task: ClassTask, samples: Sequence[Sample], num_inference_steps: int, *,
                     batch_size: int = 16, height: int | None = None, width: int | None = None,
                     state=None) -> dict:
    """Generate every sample, judge it where it was generated, gather, and summarise."""
    from eval.generate import generate_samples

    def score(images: list[Image.Image]) -> list[dict[str, int]]:
        preds = task.predict(images)
        return [{head: int(p[i]) for head, p in preds.items()} for i in range(len(images))]

    generated = generate_samples(pipe, samples, num_inference_steps, score=score, batch_size=batch_size,
                                 height=height, width=width, state=state, desc=f"generating + {task.name} classifier")
    predictions = [{"index": g.sample.index, "prompt": g.sample.prompt, "seed": g.sample.seed} | g.result
                   for g in generated]
    return summarise(task, generated) | {"predictions": predictions}
