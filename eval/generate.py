"""What every evaluation shares, and nothing else: the samples to generate, generation sharded
over Accelerate processes (`split_between_processes`), scored where it was generated and
gathered (`gather_object`) in sample order, and reading images and prompt files.

The metric modules (classes, nudity, fid) import this one; it imports none of them.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["Generated", "Sample", "generate_samples", "image_name", "image_paths", "read_image",
           "read_prompt_lines", "score_folder", "sharded"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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

    return sharded(list(samples), run, state)


def sharded(items: list, run: Callable[[list, bool], list[Generated]], state) -> list[Generated]:
    """run(shard, show_progress) over this process's shard of `items`, then gather every shard, sorted by sample index."""
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

    return sharded(items, run, state)


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


def image_name(sample: Sample) -> str:
    return f"{sample.index:05d}_seed{sample.seed}.png"
