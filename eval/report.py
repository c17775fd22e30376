"""What every evaluation shares, and `compare`, the before/after report of two models.

* `Sample`: one image to generate (prompt, seed, guidance, the labels it should show);
* `generate_samples`: generation sharded over Accelerate processes (`split_between_processes`),
  scored where it was generated, and gathered (`gather_object`) in sample order;
* reading image folders, and writing JSON, Markdown and PNG grids atomically;
* `compare`: the same prompts and seeds through the original and the erased model, scored by
  the metrics of eval/classes.py, eval/nudity.py and eval/fid.py, as JSON + Markdown + PNG.

    python -m eval compare digits path/to/erased --out reports/erased-seven
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from erase.atomic import replace_dir, write_json

logger = logging.getLogger(__name__)

__all__ = [
    "Generated",
    "Sample",
    "compare",
    "generate_samples",
    "image_grid",
    "load_image_folder",
    "versions",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ----------------------------------------------------------------------------- generation


@dataclass
class Sample:
    """One image to generate; image `index` depends only on (prompt, seed, guidance)."""

    index: int
    prompt: str
    seed: int
    guidance: float
    labels: dict[str, Any] = field(default_factory=dict)  # e.g. {"digit": 7, "colour": 0}


@dataclass
class Generated:
    """A generated sample with its per-image score and, when asked for, its pixels (H, W, 3) uint8."""

    sample: Sample
    result: Any = None
    image: np.ndarray | None = None


def generate_samples(
    pipe,
    samples: Sequence[Sample],
    num_inference_steps: int,
    *,
    score: Callable[[list[Image.Image]], list[Any]] | None = None,
    keep_images: bool = False,
    save_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    height: int | None = None,
    width: int | None = None,
    state=None,
    desc: str = "generating",
) -> list[Generated]:
    """Generate (and score) every sample; with an Accelerate `state` of several processes each
    process takes a contiguous shard and every process gets all results back, in sample order.

    `score(images)` returns one picklable result per image; it runs where the image was made.
    `keep_images` gathers the pixels too (memory: every image on every process); `save_dir`
    instead writes `{index:05d}_seed{seed}.png` there from the process that made it.
    """
    from erase.sd import generate

    def run(mine: Sequence[Sample], show: bool) -> list[Generated]:
        out: list[Generated] = []
        bar = tqdm(total=len(mine), desc=desc, disable=not show)
        for batch in _same_guidance_batches(mine, batch_size):
            images = generate(pipe, [s.prompt for s in batch], [s.seed for s in batch], num_inference_steps,
                              batch[0].guidance, batch_size=len(batch), height=height, width=width)
            results = score(images) if score is not None else [None] * len(images)
            for s, im, r in zip(batch, images, results, strict=True):
                out.append(Generated(s, r, np.asarray(im.convert("RGB")) if keep_images else None))
                if save_dir is not None:
                    im.save(Path(save_dir) / image_name(s))
            bar.update(len(batch))
        bar.close()
        return out

    return _sharded(list(samples), run, state)


def _sharded(items: list, run: Callable[[list, bool], list[Generated]], state) -> list[Generated]:
    """run() over this process's shard of `items`, then gather every shard, sorted by sample index."""
    if state is None or state.num_processes == 1:
        results = run(items, True)
    else:
        from accelerate.utils import gather_object

        with state.split_between_processes(items) as mine:
            results = run(list(mine), state.is_main_process)
        results = gather_object(results)
    return sorted(results, key=lambda g: g.sample.index)


def _same_guidance_batches(samples: Sequence[Sample], batch_size: int) -> Iterator[list[Sample]]:
    """Batches of at most `batch_size` samples sharing one guidance scale (I2P rows differ)."""
    groups: dict[float, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.guidance].append(s)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


def score_folder(
    paths: Sequence[str],
    score: Callable[[list[Image.Image]], list[Any]],
    *,
    batch_size: int = 16,
    state=None,
    desc: str = "scoring",
) -> list[Generated]:
    """Score image files (sharded like `generate_samples`); sample.prompt holds the file name."""
    items = [Sample(i, os.path.basename(p), -1, 0.0, {"path": p}) for i, p in enumerate(paths)]

    def run(mine: Sequence[Sample], show: bool) -> list[Generated]:
        out: list[Generated] = []
        for i in tqdm(range(0, len(mine), batch_size), desc=desc, disable=not show):
            batch = mine[i : i + batch_size]
            results = score([read_image(s.labels["path"]) for s in batch])
            out += [Generated(s, r) for s, r in zip(batch, results, strict=True)]
        return out

    return _sharded(items, run, state)


# ----------------------------------------------------------------------------- reading


def read_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image, or a ValueError naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}".splitlines()[0]) from err


def image_paths(folder: str | os.PathLike) -> list[str]:
    """Image files (by suffix) directly in `folder`, sorted by name; an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder not found: {folder}")
    paths = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return paths


def load_image_folder(folder: str | os.PathLike) -> list[Image.Image]:
    """Every image of `folder` (see `image_paths`) as RGB; a ValueError for an unreadable file."""
    return [read_image(p) for p in image_paths(folder)]


def read_prompt_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a text file, one prompt each."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read prompts file {path}: {err}".splitlines()[0]) from err
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


# ----------------------------------------------------------------------------- writing


def image_name(sample: Sample) -> str:
    return f"{sample.index:05d}_seed{sample.seed}.png"


@contextmanager
def shared_output_dir(target: str | os.PathLike | None, state=None) -> Iterator[Path | None]:
    """A temporary folder every process may write into, swapped in place of `target` by the main
    process when the block succeeds and removed when it fails (nothing half-written is left)."""
    if target is None:
        yield None
        return
    target = Path(target)
    tmp = target.with_name(f".{target.name}.partial")  # the same name in every process
    main = state is None or state.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if state is not None:
        state.wait_for_everyone()
    try:
        yield tmp
        if state is not None:
            state.wait_for_everyone()
        if main:
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(tmp, target)
    finally:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)


def versions() -> dict[str, str]:
    """Versions of everything that can change a number in a report."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "torchmetrics", "nudenet", "onnxruntime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def image_grid(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str], cell: int = 96) -> Image.Image:
    """Rows of image lists as one image: a label left of each row, column numbers (from 1) on top."""
    from PIL import ImageDraw

    label_width, pad, header = 80, 2, 14
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_width + columns * (cell + pad), header + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for c in range(columns):
        draw.text((label_width + c * (cell + pad) + cell // 2 - 4, 1), str(c + 1), fill="black")
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
    classifier_model: str = "microsoft/resnet-50"
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
    """Generate the same samples with both models, score both, write report.json, report.md, grid.png."""
    from erase.sd import load_pipeline, resolve_model

    samples, task = _compare_samples(opts, device)
    generated = {}
    for role, model in (("original", opts.original), ("erased", opts.erased)):
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
    for role in ("original", "erased"):
        report[role] = _score(opts, task, generated[role], device)
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


def _compare_samples(opts: CompareOptions, device) -> tuple[list[Sample], Any]:
    """Class prompts when class accuracy is asked for, else the prompts file (CSV or text)."""
    from eval import classes, nudity

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


def _score(opts: CompareOptions, task, generated: list[Generated], device) -> dict:
    from eval import classes, nudity

    images = [Image.fromarray(g.image) for g in generated]
    out: dict = {}
    if task is not None:
        predictions = task.predict(images)
        scored = [Generated(g.sample, {h: int(p[i]) for h, p in predictions.items()}) for i, g in enumerate(generated)]
        out["classes"] = classes.summarise(task, scored)
    if "nudity" in opts.metrics:
        detector = nudity.default_detector()
        per_image = nudity.detect_exposed(images, detector)
        out["nudity"] = nudity.summarise(per_image) | {"protocol": nudity.protocol(detector)}
    return out


def _fid_between(opts: CompareOptions, generated: dict[str, list[Generated]], device) -> dict:
    """FID of the erased model's images against the original model's images (same prompts, seeds)."""
    from eval import fid

    try:
        metric, name = fid.make_fid(opts.features, device=device, sync_on_compute=False)  # main process only: no sync
    except ImportError as err:  # the Inception extra is missing: say so in the report, keep the rest
        return {"fid": None, "features": opts.features, "skipped": str(err)}
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
             "| metric | original | erased | change |", "|---|---|---|---|"]
    before, after = report["original"], report["erased"]
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
        value = "skipped: " + fid["skipped"] if fid["fid"] is None else f"{fid['fid']:.3f}"
        lines += ["", f"FID of the erased model's images against the original's ({fid['features']} features): {value}"]
    lines += ["", "![before and after](grid.png)", "",
              "Grid columns (top row original, bottom row erased, first seed of each prompt):", ""]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(report["grid_prompts"])]
    return "\n".join(lines) + "\n"
