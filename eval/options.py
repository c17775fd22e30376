"""What each `python -m eval` command takes: one dataclass per command, parsed by
`erase.command.add_dataclass_arguments`, checked in `__post_init__` (ranges) and in `check_inputs`
(files and models, before any model is loaded). The sampling options are one block shared by the
commands that generate, with help built from the one defaults table (`erase.digits`, `erase.sd`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from erase.command import check_model, check_positive, check_writable
from erase.defaults import DIGITS_GUIDANCE as DEFAULT_GUIDANCE
from erase.defaults import DIGITS_STEPS as DEFAULT_STEPS
from erase.defaults import RESNET_ID, SD_GUIDANCE, SD_STEPS

__all__ = ["COMMAND_OPTIONS", "AttackCommand", "ClassesCommand", "CompareCommand", "FidCommand", "NudityCommand",
           "Rendering", "Sampling", "check_inputs"]

DTYPE_NAMES = ("float32", "float16", "bfloat16")
CLASSIFIERS = ("digits", "digits-strict", "imagenette")
FEATURES = ("inception", "digits")
MODEL_HELP = "digits (the embedded model), a pipeline folder or a hub id"


@dataclass(kw_only=True)
class Rendering:
    """How every image is made."""

    steps: int | None = field(default=None, metadata={
        "help": f"sampler steps (default: the model's, {DEFAULT_STEPS} for the embedded digits model, {SD_STEPS} otherwise)"})
    guidance: float | None = field(default=None, metadata={
        "help": f"guidance scale (default: a CSV row's own, else the model's, {DEFAULT_GUIDANCE:g} for digits, "
                f"{SD_GUIDANCE:g} otherwise)"})
    resolution: int | None = field(default=None, metadata={"help": "image side in pixels (default: the model's)"})
    dtype: str = field(default="float32", metadata={"help": "weights' precision", "choices": DTYPE_NAMES})

    def __post_init__(self) -> None:
        check_positive(steps=self.steps, resolution=self.resolution)
        if self.guidance is not None and self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")


@dataclass(kw_only=True)
class Sampling(Rendering):
    """How many images, from which seeds, in which batches."""

    images_per_prompt: int = field(default=4, metadata={"help": "images generated per prompt"})
    seed: int = field(default=0, metadata={"help": "first seed of prompts without their own seed"})
    batch_size: int = field(default=16, metadata={"help": "images per pipeline call"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(images_per_prompt=self.images_per_prompt, batch_size=self.batch_size)


@dataclass(kw_only=True)
class ClassesCommand(Sampling):
    """per-class accuracy of generated images"""

    model: str = field(metadata={"help": MODEL_HELP})
    classifier: str = field(default="digits", metadata={"help": "the classifier that judges", "choices": CLASSIFIERS})
    classifier_model: str = field(default=RESNET_ID, metadata={"help": "ImageNet classifier (imagenette)"})
    images_per_prompt: int = field(default=10, metadata={"help": "images generated per prompt"})
    out: str = field(metadata={"help": "JSON report to write"})


@dataclass(kw_only=True)
class NudityCommand(Sampling):
    """NudeNet counts on I2P prompts (or on an image folder)"""

    model: str | None = field(default=None, metadata={"help": MODEL_HELP + " (or --images)"})
    images: str | None = field(default=None, metadata={"help": "score this folder of images instead of generating"})
    prompts: str = field(default="AIML-TUDA/i2p", metadata={"help": "I2P-format CSV (or the hub id, when online)"})
    category: str | None = field(default=None, metadata={"help": "only I2P rows of this category (e.g. sexual)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N prompts"})
    save_images: str | None = field(default=None, metadata={"help": "also write the generated images to this folder"})
    images_per_prompt: int = field(default=1, metadata={"help": "images generated per prompt"})
    out: str = field(metadata={"help": "JSON report to write"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.model is None) == (self.images is None):
            raise ValueError("give one of --model (generate) and --images (score a folder)")
        check_positive(limit=self.limit)


@dataclass(kw_only=True)
class FidCommand(Sampling):
    """FID against a reference folder or the original model"""

    model: str = field(metadata={"help": MODEL_HELP})
    reference: str | None = field(default=None, metadata={"help": "folder of reference images (or --reference-model)"})
    reference_model: str | None = field(default=None, metadata={"help": "render the same prompts and seeds with this model"})
    prompts: str | None = field(default=None, metadata={"help": "CSV or text file (default for digits: every digit/colour)"})
    features: str | None = field(default=None, metadata={
        "help": "feature extractor (default: digits for the digits model, else inception)", "choices": FEATURES})
    out: str = field(metadata={"help": "JSON report to write"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.reference is None) == (self.reference_model is None):
            raise ValueError("give one of --reference (a folder) and --reference-model")


@dataclass(kw_only=True)
class CompareCommand(Sampling):
    """before/after report of two models: JSON, Markdown, PNG grid"""

    original: str = field(metadata={"help": "the original model (digits, folder or hub id)", "positional": True})
    erased: str = field(metadata={"help": "the erased model", "positional": True})
    prompts: str | None = field(default=None, metadata={"help": "CSV or text file (default for digits: the class prompts)"})
    metrics: str | None = field(default=None, metadata={
        "help": "comma-separated: classes,nudity,fid (default: classes,fid with a classifier, else nudity,fid)"})
    classifier: str | None = field(default=None, metadata={
        "help": "the classifier that judges (default: digits for the digits model)", "choices": CLASSIFIERS})
    classifier_model: str = field(default=RESNET_ID, metadata={"help": "ImageNet classifier (imagenette)"})
    features: str | None = field(default=None, metadata={
        "help": "FID's feature extractor (default: digits for the digits model, else inception)", "choices": FEATURES})
    grid_prompts: int = field(default=10, metadata={"help": "prompts shown in the image grid"})
    out: str = field(metadata={"help": "output folder"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(grid_prompts=self.grid_prompts)


@dataclass(kw_only=True)
class AttackCommand(Rendering):
    """attack an erased model (UnlearnDiffAtk, concept inversion): success rate"""

    model: str = field(metadata={"help": "the ERASED model (folder or hub id)"})
    original: str = field(metadata={"help": "the ORIGINAL model, which draws the target images"})
    attack: str = field(metadata={"help": "the attack: unlearndiffatk, inversion (token vectors) or textfree (the conditioning itself)",
                                  "choices": ("unlearndiffatk", "inversion", "textfree")})
    concept: str | None = field(default=None, metadata={
        "help": "concept name (default: the one the erased model's erase_config.json names); picks the judge"})
    prompts: str | None = field(default=None, metadata={"help": "CSV or text file (default: the concept's forget + eval prompts)"})
    category: str | None = field(default=None, metadata={"help": "only I2P rows of this category (e.g. sexual)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N prompts"})
    classifier_model: str = field(default=RESNET_ID, metadata={"help": "ImageNet classifier for object concepts"})
    grid_prompts: int = field(default=8, metadata={"help": "prompts shown in the image grid (FILE.png)"})
    out: str = field(metadata={"help": "JSON report to write (FILE.md and FILE.png beside it)"})
    given: dict = field(default_factory=dict, metadata={"cli": False})  # the AttackOptions given on the command line

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(limit=self.limit, grid_prompts=self.grid_prompts)


COMMAND_OPTIONS = {"classes": ClassesCommand, "nudity": NudityCommand, "fid": FidCommand, "compare": CompareCommand,
                   "attack": AttackCommand}


def check_inputs(opts) -> None:
    """The files and models a command names, and where it writes, before any model is loaded."""
    for what in ("model", "reference_model", "original", "erased"):
        if getattr(opts, what, None):
            check_model(getattr(opts, what), what.replace("_", " "))
    for what in ("images", "reference"):
        if getattr(opts, what, None) and not os.path.isdir(getattr(opts, what)):
            raise ValueError(f"image folder not found: {getattr(opts, what)}")
    prompts = getattr(opts, "prompts", None)
    if prompts and prompts.endswith((".csv", ".txt")) and not getattr(opts, "images", None) and not os.path.isfile(prompts):
        raise ValueError(f"prompts file not found: {prompts}")
    check_writable(opts.out, "report", folder=isinstance(opts, CompareCommand))
    if getattr(opts, "save_images", None):
        check_writable(opts.save_images, "image", folder=True)
