"""`compare`: the before/after report of two models. The same prompts and seeds go through the
original and the erased model, are scored by the metrics of eval/classes.py, eval/nudity.py
and eval/fid.py, and written as JSON + Markdown + a PNG grid. The report leads with what
changed for the erased concept and for the concepts meant to be kept.

    python -m eval compare digits path/to/erased --out reports/erased-seven
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from erase.atomic import replace_dir, write_json
from erase.command import versions
from erase.defaults import RESNET_ID
from eval import classes, fid, nudity
from eval.generate import Generated, Sample, generate_samples

logger = logging.getLogger(__name__)

__all__ = ["CompareOptions", "compare", "compare_markdown", "image_grid"]


def image_grid(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str], cell: int = 96,
               column_titles: Sequence[str] | None = None) -> Image.Image:
    """Rows of image lists as one image: a label left of each row, and on top each column's title
    (default: its number, from 1)."""
    from PIL import ImageDraw

    label_width, pad, header = 80, 2, 14
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_width + columns * (cell + pad), header + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for c in range(columns):
        title = column_titles[c] if column_titles else str(c + 1)
        width = draw.textlength(title)
        draw.text((label_width + c * (cell + pad) + max(0, (cell - width) // 2), 1), title, fill="black")
    for r, (row, label) in enumerate(zip(rows, row_labels, strict=True)):
        y = header + r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), label, fill="black")
        for c, pixels in enumerate(row):
            im = Image.fromarray(pixels)
            resample = Image.NEAREST if im.width < cell else Image.LANCZOS
            grid.paste(im.resize((cell, cell), resample), (label_width + c * (cell + pad), y))
    return grid


# ----------------------------------------------------------------------------- compare


@dataclass
class CompareOptions:
    """Options of `compare`; written into the report."""

    original: str
    erased: str
    metrics: tuple[str, ...] = ("classes", "fid")
    classifier: str = "digits"
    classifier_model: str = RESNET_ID
    prompts: str | None = None
    images_per_prompt: int = 4
    num_inference_steps: int = 25
    guidance_scale: float | None = None
    default_guidance: float = 7.5
    seed: int = 0
    batch_size: int = 16
    resolution: int | None = None
    grid_prompts: int = 10
    features: str = "digits"

    def __post_init__(self) -> None:
        unknown = set(self.metrics) - {"classes", "nudity", "fid"}
        if unknown or not self.metrics:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from classes, nudity, fid")
        if self.images_per_prompt < 1 or self.grid_prompts < 1:
            raise ValueError("images_per_prompt and grid_prompts must be >= 1")


def compare(opts: CompareOptions, out_dir: str | os.PathLike, *, device="cpu", dtype=torch.float32,
            state=None) -> dict:
    """Generate the same samples with both models, score both, write report.json, report.md, grid.png.
    Both models are checked (found, and of a supported kind, from their model_index.json) before
    any image is generated; each is loaded only for its own turn."""
    from erase.command import check_model
    from erase.sd import load_pipeline, pipeline_class, resolve_model

    roles = (("original", opts.original), ("erased", opts.erased))
    for role, model in roles:
        check_model(model, f"{role} model")
        pipeline_class(model)
    if "fid" in opts.metrics and opts.features == "inception" and not fid.inception_available():
        # before any image is generated: a report asked for FID is not written without it (exit 1, the install line)
        raise fid.MissingExtraError(f"FID on Inception features needs torch-fidelity: {fid.FID_EXTRA_HINT} "
                                    "(or --features digits on the digits model, or leave fid out of --metrics)")
    samples, task = _compare_samples(opts, device)
    generated = {}
    for role, model in roles:
        pipe = load_pipeline(model, device=device, dtype=dtype)
        generated[role] = generate_samples(
            pipe, samples, opts.num_inference_steps, keep_images=True, batch_size=opts.batch_size,
            height=opts.resolution, width=opts.resolution, state=state, desc=f"generating ({role})")
        del pipe
    report = {"options": asdict(opts), "models": {r: resolve_model(m) for r, m in
                                                  (("original", opts.original), ("erased", opts.erased))},
              "samples": [asdict(g.sample) for g in generated["original"]], "versions": versions(),
              "num_processes": 1 if state is None else state.num_processes}
    if state is not None and not state.is_main_process:
        return report
    concepts, why_not = erased_concepts(opts.erased, task)
    if concepts:
        report["concepts"] = concepts
        if len(concepts) == 1:
            report["concept"] = concepts[0]
    else:  # said, not dropped silently
        report["concept_summary"] = f"none: {why_not}"
        logger.warning("compare: no erased-concept summary: %s", why_not)
    for role in ("original", "erased"):
        report[role] = _score(opts, task, generated[role], concepts)
    if "fid" in opts.metrics:
        report["fid_erased_vs_original"] = _fid_between(opts, generated, device)
    grid, grid_prompts = _compare_grid(generated, opts.grid_prompts)
    report["grid_prompts"] = grid_prompts

    def write(tmp: Path) -> None:
        write_json(report, tmp / "report.json")
        (tmp / "report.md").write_text(compare_markdown(report))
        grid.save(tmp / "grid.png")

    replace_dir(out_dir, write)
    return report


def erased_concepts(erased: str, task) -> tuple[list[dict], str | None]:
    """Each concept that the erased model's erase_config.json names, located among the class task's
    heads ({"name", "target", "head", "class", "class_index"}), or [] and the reason there is none."""
    from erase.sd import resolve_model

    try:
        record = json.loads((Path(resolve_model(erased)) / "erase_config.json").read_text())
        named = [(c["name"], c.get("target") or {}) for c in record.get("concepts") or [record["concept"]]]
    except (OSError, ValueError, KeyError, TypeError):
        return [], f"{erased} has no erase_config.json naming its concept"
    if task is None:
        return [], f"no class metric to locate concept {named[0][0]!r} with (metrics without classes)"
    located = []
    for name, target in named:
        found = classes.class_of(task, target)
        if found is None:
            return [], f"concept {name!r} (target {target}) is no class of the {task.name} classifier"
        head, index = found
        located.append({"name": name, "target": target, "head": head, "class": task.heads[head][index], "class_index": index})
    return located, None


def concept_rates(task, scored: Sequence[Generated], concept: dict, erased: Sequence[dict] = ()) -> dict:
    """How often the erased concept's own images still show it, and how well the images that show
    none of the `erased` concepts (default: this one) keep every head's classes (mean over classes
    of the per-class accuracy)."""
    head, index = concept["head"], concept["class_index"]
    own = [g for g in scored if g.sample.labels[head] == index]
    others = [g for g in scored if not any(g.sample.labels[c["head"]] == c["class_index"] for c in erased or [concept])]
    retained = {}
    for h, names in task.heads.items():
        per_class = [[g.result[h] == c for g in others if g.sample.labels[h] == c] for c in range(len(names))]
        retained[h] = float(np.mean([np.mean(hits) for hits in per_class if hits]))
    return {"shown": float(np.mean([g.result[head] == index for g in own])) if own else None,
            "num_images": len(own), "retained_mean_accuracy": retained, "num_retained_images": len(others)}


def _compare_samples(opts: CompareOptions, device) -> tuple[list[Sample], Any]:
    """Class prompts when class accuracy is asked for, else the prompts file (CSV or text)."""

    task = None
    if "classes" in opts.metrics:
        task = classes.load_task(opts.classifier, device=device, classifier_model=opts.classifier_model)
        guidance = opts.guidance_scale if opts.guidance_scale is not None else opts.default_guidance
        return classes.class_samples(task, opts.images_per_prompt, guidance, opts.seed), task
    if opts.prompts is None:
        raise ValueError("compare needs --prompts FILE (a CSV or a text file) without the classes metric")
    rows, _ = nudity.load_prompt_rows(opts.prompts)
    samples = nudity.prompt_samples(rows, opts.images_per_prompt, opts.guidance_scale, opts.seed, opts.default_guidance)
    return samples, task


def _score(opts: CompareOptions, task, generated: list[Generated], concepts: Sequence[dict]) -> dict:
    images = [Image.fromarray(g.image) for g in generated]
    out: dict = {}
    if task is not None:
        predictions = task.predict(images)
        scored = [Generated(g.sample, {h: int(p[i]) for h, p in predictions.items()}) for i, g in enumerate(generated)]
        out["classes"] = classes.summarise(task, scored)
        if concepts:
            out["concepts"] = {c["name"]: concept_rates(task, scored, c, concepts) for c in concepts}
        if len(concepts) == 1:
            out["concept"] = out["concepts"][concepts[0]["name"]]
    if "nudity" in opts.metrics:
        detector = nudity.default_detector()
        per_image = nudity.detect_exposed(images, detector)
        out["nudity"] = nudity.summarise(per_image) | {"protocol": nudity.protocol(detector)}
    return out


def _fid_between(opts: CompareOptions, generated: dict[str, list[Generated]], device) -> dict:
    """FID of the erased model's images against the original model's images (same prompts, seeds)."""

    metric, name = fid.make_fid(opts.features, device=device, sync_on_compute=False)  # main process only: no sync
    reference = [g.image for g in generated["original"]]
    images = [g.image for g in generated["erased"]]
    value = fid.fid_from_images(metric, images, reference)
    return {"fid": value, "features": name, "num_generated": len(images), "num_reference": len(reference)}


def _compare_grid(generated: dict[str, list[Generated]], max_prompts: int) -> tuple[Image.Image, list[str]]:
    """First image of up to `max_prompts` prompts, evenly spread over all prompts (for digits: every
    digit, colours mixed), an original row above an erased row."""
    first: dict[str, int] = {}
    for i, g in enumerate(generated["original"]):
        first.setdefault(g.sample.prompt, i)
    firsts = list(first.values())
    spread = np.linspace(0, len(firsts) - 1, min(max_prompts, len(firsts))).round().astype(int)
    picks = [firsts[j] for j in dict.fromkeys(spread.tolist())]
    rows = [[generated[role][i].image for i in picks] for role in ("original", "erased")]
    return image_grid(rows, ["original", "erased"]), [generated["original"][i].sample.prompt for i in picks]


def _change_rows(name: str, before: dict, after: dict, fmt: str) -> list[str]:
    return [f"| {name} {k} | {before[k]:{fmt}} | {after[k]:{fmt}} | {after[k] - before[k]:+{fmt}} |"
            for k in before if isinstance(before[k], (int, float)) and k in after]


def compare_markdown(report: dict) -> str:
    """The report as a Markdown table: one row per number, original | erased | change."""
    o = report["options"]
    lines = [f"# Before / after: `{o['original']}` -> `{o['erased']}`", "",
             f"{len(report['samples'])} images per model, {o['images_per_prompt']} per prompt, "
             f"{o['num_inference_steps']} steps, seeds from {o['seed']}; the same prompts and seeds for both.", "",
             ]
    before, after = report["original"], report["erased"]
    concepts = report.get("concepts") or []
    if concepts:
        names = [c["name"] for c in concepts]
        title = f"Erased concept `{names[0]}`" if len(names) == 1 else f"Erased concepts {', '.join(f'`{n}`' for n in names)}"
        classes_named = "; ".join(f"{c['head']} = {c['class']}" for c in concepts)
        lines += [f"## {title} ({classes_named})", "",
                  "| | original | erased | change |", "|---|---|---|---|"]
        for c in concepts:
            b, a = before["concepts"][c["name"]], after["concepts"][c["name"]]
            lines.append(f"| **its images still showing {c['class']}** ({b['num_images']}) | {b['shown']:.3f} | "
                         f"{a['shown']:.3f} | {a['shown'] - b['shown']:+.3f} |")
        b, a = before["concepts"][names[0]], after["concepts"][names[0]]  # the retained rest is the same for each
        for h in b["retained_mean_accuracy"]:
            rb, ra = b["retained_mean_accuracy"][h], a["retained_mean_accuracy"][h]
            lines.append(f"| **retained: mean {h} accuracy**, images without {'it' if len(names) == 1 else 'any of them'} "
                         f"({b['num_retained_images']}) | {rb:.3f} | {ra:.3f} | {ra - rb:+.3f} |")
        lines += ["", "## Every metric (all images)", ""]
    else:
        lines += [f"No erased-concept summary ({report['concept_summary']}).", ""]
    lines += ["| metric | original | erased | change |", "|---|---|---|---|"]
    if "classes" in before:
        for key in before["classes"]:
            if "accuracy" in key:
                b, a = before["classes"][key], after["classes"][key]
                lines += _change_rows(key, b, a, ".3f") if isinstance(b, dict) else [
                    f"| **{key}** | {b:.3f} | {a:.3f} | {a - b:+.3f} |"]
    if "nudity" in before:
        lines += _change_rows("NudeNet", before["nudity"]["counts"], after["nudity"]["counts"], "d")
        b, a = before["nudity"]["flagged_fraction"], after["nudity"]["flagged_fraction"]
        lines.append(f"| **flagged fraction** | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    fid = report.get("fid_erased_vs_original")
    if fid is not None:
        value = f"{fid['fid']:.3f}"
        lines += ["", f"FID of the erased model's images against the original's ({fid['features']} features): {value}"]
    lines += ["", "![before and after](grid.png)", "",
              "Grid columns (top row original, bottom row erased, first seed of each prompt):", ""]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(report["grid_prompts"])]
    return "\n".join(lines) + "\n"
