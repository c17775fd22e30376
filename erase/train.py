"""Erase a concept from a Stable Diffusion model.

    accelerate launch erase/train.py --concept nudity --output-dir nudity-erased
    accelerate launch erase/train.py --model digits --concept seven --output-dir seven-erased

Methods, all in one loop on the same data so comparisons are fair: `salun` (SalUn: remap c to
c' plus beta * retain loss, only salient weights move), `rl` (the same without the mask),
`esd-x` and `esd-u` (ESD with a frozen teacher, cross-attention or the rest of the UNet).
The output folder is a complete diffusers pipeline (safetensors) with erase_config.json and
saliency_mask.safetensors; it appears only when training has finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Why here: transformers prints notes about optional packages (torchvision) while diffusers
# imports it; a command's stderr should hold progress bars and our own one-line errors.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import ProjectConfiguration, set_seed  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from erase.atomic import replace_dir, shared_output_dir, write_json  # noqa: E402
from erase.cli import (  # noqa: E402
    add_dataclass_arguments,
    check_positive,
    check_prompts,
    check_writable,
    one_line_errors,
    quiet_libraries,
    versions,
)
from erase.concepts import Concept, custom_concept, load_concept  # noqa: E402
from erase.erasure_data import (  # noqa: E402
    batch_for,
    hold_frozen,
    prepare_data,
    release_frozen,
    saliency_mask,
)
from erase.objectives import (  # noqa: E402
    ESD_TARGETS,
    esd_loss,
    salun_loss,
    step_generator,
)
from erase.saliency import (  # noqa: E402
    MaskedUpdate,
    check_ratio,
    load_mask,
    mask_fraction,
    save_mask,
    select_parameters,
)
from erase.sd import load_pipeline  # noqa: E402

logger = get_logger(__name__)

METHODS = ("salun", "rl", "esd-x", "esd-u")


@dataclass
class TrainConfig:
    """Options of `erase/train.py`; paper defaults (SalUn, nudity). A concept file's `train:`
    section overrides them for its model, and command-line flags override both."""

    concept: str | None = field(default=None, metadata={"help": "concept name from prompts/*.yaml"})
    forget_prompt: list[str] = field(default_factory=list, metadata={"help": "custom concept: prompt(s) c to forget"})
    anchor_prompt: list[str] = field(default_factory=list, metadata={"help": "custom concept: anchor prompt(s) c'"})
    retain_prompt: list[str] = field(default_factory=list, metadata={"help": "custom concept: prompts to keep"})
    pretrained_model_name_or_path: str = field(default="CompVis/stable-diffusion-v1-4", metadata={"help": "hub id, folder, or `digits`"})
    method: str = field(default="salun", metadata={"help": "salun, rl, esd-x or esd-u"})
    mask_ratio: float = field(default=0.5, metadata={"help": "fraction of UNet weights SalUn may update, in (0, 1]"})
    mask: str | None = field(default=None, metadata={"help": "reuse a saved saliency mask instead of computing one"})
    beta: float = field(default=0.1, metadata={"help": "weight of the retain loss (SalUn Eq. 9)"})
    eta: float = field(default=1.0, metadata={"help": "negative guidance of ESD"})
    learning_rate: float = field(default=1e-5, metadata={"help": "Adam learning rate"})
    train_batch_size: int = field(default=8, metadata={"help": "forget and retain images per step and process"})
    max_train_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    num_images: int = field(default=800, metadata={"help": "images in the forget set and in the retain set"})
    generation_steps: int = field(default=50, metadata={"help": "sampler steps when generating the sets"})
    guidance_scale: float = field(default=7.5, metadata={"help": "guidance when generating the sets, and g of the mask loss"})
    resolution: int | None = field(default=None, metadata={"help": "image size of the generated sets (model default)"})
    generation_batch_size: int = field(default=16, metadata={"help": "images per batch when generating the sets"})
    saliency_batch_size: int = field(default=8, metadata={"help": "forget images per gradient batch for the mask"})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass (less memory)"})
    checkpointing_steps: int = field(default=50, metadata={"help": "save a resumable checkpoint every N steps"})
    logging_steps: int = field(default=10, metadata={"help": "log the mean losses every N steps (reading them waits for the device)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "`latest` or a checkpoint-N folder"})
    output_dir: str = field(default="erased-model", metadata={"help": "the erased pipeline's folder"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})
    cache_dir: str = field(default=os.path.join(os.path.expanduser("~"), ".cache", "erase"), metadata={"help": "generated image sets"})
    report_to: str | None = field(default=None, metadata={"help": "tracker (default: tensorboard when installed)"})
    seed: int = field(default=0, metadata={"help": "training randomness (the generated sets use fixed seeds)"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        check_ratio(self.mask_ratio)
        if not self.concept and not self.forget_prompt:
            raise ValueError("give --concept NAME or --forget-prompt TEXT")
        if self.max_train_steps < 0 or self.train_batch_size < 1 or self.num_images < 1:
            raise ValueError("max_train_steps must be >= 0, train_batch_size and num_images >= 1")
        if min(self.generation_batch_size, self.saliency_batch_size, self.logging_steps) < 1:
            raise ValueError("generation_batch_size, saliency_batch_size and logging_steps must be >= 1")
        check_positive(learning_rate=self.learning_rate, generation_steps=self.generation_steps,
                       gradient_accumulation_steps=self.gradient_accumulation_steps, resolution=self.resolution)
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if min(self.beta, self.eta, self.guidance_scale, self.checkpointing_steps) < 0:
            raise ValueError("beta, eta, guidance_scale and checkpointing_steps must be >= 0")
        check_prompts("forget_prompt", self.forget_prompt)
        check_prompts("anchor_prompt", self.anchor_prompt)
        check_prompts("retain_prompt", self.retain_prompt)
        if self.mask is not None and not os.path.isfile(self.mask):
            raise ValueError(f"mask file not found: {self.mask}")
        check_writable(self.output_dir, "output")
        check_writable(self.cache_dir, "cache")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")

    def resolve_concept(self) -> Concept:
        if self.concept:
            return load_concept(self.concept)
        return custom_concept(self.forget_prompt, self.anchor_prompt, self.retain_prompt)


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = one_line_errors(argparse.ArgumentParser(prog="erase/train.py", description=__doc__.split("\n\n")[0]))
    add_dataclass_arguments(parser, TrainConfig, aliases={"pretrained_model_name_or_path": ["--model"]}, suppress=True)
    given = vars(parser.parse_args(argv))
    # a concept file's `train:` recipe sits between the paper defaults and the flags
    recipe = {}
    if given.get("concept"):
        recipe = load_concept(given["concept"]).train
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in recipe.items() if k in known}, **given})


# ----------------------------------------------------------------------------- mask


def trainable_mask(unet, cfg: TrainConfig, scheduler, data, accelerator, staging: str, given=None, resume: bool = False) -> dict[str, torch.Tensor]:
    """The weights this run may change: the saliency mask (salun), all (rl), or ESD's subset."""
    saved = os.path.join(staging, "saliency_mask.safetensors")
    if resume and os.path.isfile(saved):  # the mask of the interrupted run
        return load_mask(saved, unet)
    if cfg.method == "salun":
        if given is not None:
            return given
        return {n: m.cpu() for n, m in saliency_mask(unet, scheduler, data, cfg, accelerator).items()}  # 1 byte a weight: off the GPU
    chosen = {n for n, _ in select_parameters(unet, ESD_TARGETS.get(cfg.method, ".*"))}
    return {n: torch.full(p.shape, n in chosen, dtype=torch.bool) for n, p in unet.named_parameters()}


# ----------------------------------------------------------------------------- main


def staging_dir(output_dir: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(output_dir)), "." + os.path.basename(os.path.abspath(output_dir)) + ".partial")


def check_output_dir(cfg: TrainConfig) -> None:
    if os.path.isdir(cfg.output_dir) and os.listdir(cfg.output_dir) and not cfg.overwrite:
        raise ValueError(f"output folder {cfg.output_dir} exists and is not empty (pass --overwrite to replace it)")
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise ValueError(f"output path {cfg.output_dir} is a file")


def latest_checkpoint(staging: str, which: str | None) -> str | None:
    if not which:
        return None
    if which != "latest":
        if not os.path.isdir(which):
            raise ValueError(f"checkpoint folder not found: {which}")
        return which
    folder = os.path.join(staging, "checkpoints")
    steps = [int(m.group(1)) for d in os.listdir(folder) if (m := re.fullmatch(r"checkpoint-(\d+)", d))] if os.path.isdir(folder) else []
    return os.path.join(folder, f"checkpoint-{max(steps)}") if steps else None


def save_checkpoint(accelerator: Accelerator, folder: str) -> None:
    """save_state into a temporary folder, then rename: a run killed mid-write leaves no
    half checkpoint for `--resume-from-checkpoint latest` to pick up."""
    with shared_output_dir(folder, accelerator) as tmp:
        accelerator.save_state(str(tmp))


WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since the last call (None off CUDA), then reset the peak."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def frozen_copy(unet: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """ESD's teacher: a frozen copy of the UNet made directly in `dtype` (no transient fp32 copy)."""
    with torch.device("meta"):
        teacher = type(unet).from_config(unet.config).to(dtype)
    teacher.to_empty(device=unet.device)
    teacher.load_state_dict(unet.state_dict())  # copy_ casts to dtype
    return teacher.requires_grad_(False).eval()


def train(cfg: TrainConfig) -> str:
    concept = cfg.resolve_concept()
    check_output_dir(cfg)
    staging = staging_dir(cfg.output_dir)
    checkpoint = latest_checkpoint(staging, cfg.resume_from_checkpoint)
    report_to = cfg.report_to or ("tensorboard" if importlib.util.find_spec("tensorboard") else None)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=staging, logging_dir=os.path.join(staging, "logs")),
    )
    device = accelerator.device
    if cfg.mixed_precision == "fp16" and not accelerator.native_amp:
        raise ValueError(f"--mixed-precision fp16 needs a GPU (this process runs on {device.type}); use bf16 or no")
    if checkpoint is None and os.path.isdir(staging) and accelerator.is_main_process:
        logger.warning(f"starting afresh: removing the unfinished run in {staging}")
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    # the frozen parts run in weight_dtype; the trained UNet keeps fp32 master weights
    weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    autocast_dtype = weight_dtype if cfg.mixed_precision != "no" else None
    pipe = load_pipeline(cfg.pretrained_model_name_or_path, device="cpu")
    unet = pipe.unet.to(device)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
    given_mask = load_mask(cfg.mask, unet) if cfg.mask else None  # fail before any generation
    peaks: dict[str, float | None] = {}
    peak_memory_gib(device)
    start = time.perf_counter()
    originals = hold_frozen(pipe, device, weight_dtype)
    data = prepare_data(pipe, cfg, concept, accelerator, autocast_dtype)
    release_frozen(pipe, originals)
    seconds_data = time.perf_counter() - start
    peaks["data"] = peak_memory_gib(device)

    start = time.perf_counter()
    mask = trainable_mask(unet, cfg, scheduler, data, accelerator, staging, given_mask, resume=checkpoint is not None)
    seconds_mask = time.perf_counter() - start
    peaks["mask"] = peak_memory_gib(device)
    if accelerator.is_main_process:
        os.makedirs(staging, exist_ok=True)
        save_mask(mask, os.path.join(staging, "saliency_mask.safetensors"), metadata={"method": cfg.method, "concept": concept.name})

    frozen_unet = frozen_copy(unet, weight_dtype) if cfg.method.startswith("esd") else None
    trainable = {n for n, m in mask.items() if bool(m.any())}
    for n, p in unet.named_parameters():
        p.requires_grad_(n in trainable)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    # fused Adam on CUDA: one kernel for all weights and no foreach temporaries the size of the model
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, fused=device.type == "cuda")
    update = MaskedUpdate(unet, {n: m for n, m in mask.items() if n in trainable}).attach(optimizer)
    kept = mask_fraction(mask)
    del mask  # MaskedUpdate holds it bit-packed
    unet, optimizer = accelerator.prepare(unet, optimizer)

    first_step = 0
    if checkpoint:
        accelerator.load_state(checkpoint)
        first_step = int(checkpoint.rstrip("/").rsplit("-", 1)[1])
        logger.info(f"resumed from {checkpoint}")
    if accelerator.is_main_process and report_to:
        accelerator.init_trackers("erase", config={k: v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, (int, float, str, bool))})

    progress = tqdm(range(cfg.max_train_steps), initial=first_step, desc=f"{cfg.method} {concept.name}", disable=not accelerator.is_local_main_process)
    logs: dict[str, float] = {}
    running: dict[str, torch.Tensor] = {}  # loss sums on the device since the last log
    start = time.perf_counter()
    unet.train()
    for step in range(first_step, cfg.max_train_steps):
        for micro in range(cfg.gradient_accumulation_steps):
            g = step_generator(cfg.seed, step, micro, accelerator.process_index, device=device)
            forget, retain = batch_for(data, scheduler, cfg, g)
            with accelerator.accumulate(unet), accelerator.autocast():
                if frozen_unet is not None:
                    loss, terms = esd_loss(unet, frozen_unet, forget, cfg.eta)
                else:
                    loss, terms = salun_loss(unet, forget, retain, cfg.beta)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():
                running[k] = running.get(k, 0) + v / cfg.gradient_accumulation_steps
        progress.update(1)
        done = step + 1
        if done % cfg.logging_steps == 0 or done == cfg.max_train_steps:  # the only host sync of the loop
            count = done - max(first_step, (done - 1) // cfg.logging_steps * cfg.logging_steps)
            logs = {k: float(v) / count for k, v in running.items()}
            running = {}
            progress.set_postfix(**{k: f"{v:.4f}" for k, v in logs.items()})
            accelerator.log(logs, step=done)
        if cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0 and done < cfg.max_train_steps:
            save_checkpoint(accelerator, os.path.join(staging, "checkpoints", f"checkpoint-{done}"))
    seconds_train = time.perf_counter() - start
    peaks["train"] = peak_memory_gib(device)
    progress.close()
    update.remove()
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        pipe.unet = accelerator.unwrap_model(unet)
        record = {
            "config": dataclasses.asdict(cfg),
            "concept": dataclasses.asdict(concept),
            "mask": {"trainable_fraction": kept, "file": "saliency_mask.safetensors"},
            "num_processes": accelerator.num_processes,
            "final_losses": logs,
            "seconds": {"data": seconds_data, "mask": seconds_mask, "train": seconds_train},
            "peak_memory_gib": peaks,
            "device": str(device),
            "resumed_from": checkpoint,
            "versions": versions(),
        }
        publish(pipe, staging, cfg, record)
    accelerator.end_training()
    return cfg.output_dir


def publish(pipe, staging: str, cfg: TrainConfig, record: dict) -> None:
    """Write the pipeline beside the output folder, then move it into place in one rename."""

    def write(folder: Path) -> None:
        start = time.perf_counter()
        pipe.save_pretrained(folder, safe_serialization=True)
        record["seconds"]["save"] = time.perf_counter() - start
        shutil.copy(os.path.join(staging, "saliency_mask.safetensors"), folder / "saliency_mask.safetensors")
        write_json(record, folder / "erase_config.json")

    replace_dir(cfg.output_dir, write)  # --overwrite was checked before any work
    shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    quiet_libraries()
    try:
        cfg = parse_args(argv)
        out = train(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"erased {cfg.concept or 'custom concept'} with {cfg.method}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
