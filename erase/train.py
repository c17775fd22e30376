"""Erase a concept from a Stable Diffusion model.

    accelerate launch erase/train.py --concept nudity --output-dir nudity-erased
    accelerate launch erase/train.py --model digits --concept seven --output-dir seven-erased

    accelerate launch erase/train.py --model digits --concept seven --concept red --method uce

Methods, all in one loop on the same data so comparisons are fair: `salun` (SalUn: remap c to
c' plus beta * retain loss, only salient weights move), `rl` (the same without the mask),
`esd-x` and `esd-u` (ESD with a frozen teacher, cross-attention or the rest of the UNet); and
`uce`, the closed-form edit of the cross-attention keys and values (erase/uce.py, no training).
`--concept` repeats: several concepts are erased in one run (one mask, one loop, all their
forget/anchor pairs, the retain prompts that none of them forgets).
The output folder is a complete diffusers pipeline (safetensors) with erase_config.json and
saliency_mask.safetensors; it appears only when training has finished.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

# Why here: transformers prints notes about optional packages (torchvision) while diffusers
# imports it; a command's stderr should hold progress bars and our own one-line errors.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import AutocastKwargs, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from erase import sharding
from erase.adversarial import AdversarialTokens, TrainedTextEncoders
from erase.atomic import replace_dir, write_json
from erase.checkpoints import check_output_dir, latest_checkpoint, save_checkpoint, save_masks, staging_dir
from erase.command import (
    BadInput,
    check_launch,
    quiet_libraries,
    run_command,
    versions,
)
from erase.concepts import load_concept, merge_concepts
from erase.config import parse_train_args
from erase.erasure import (
    WEIGHT_DTYPES,
    TrainConfig,
    masked_optimizer,
    prepare_data,
    train_steps,
    trainable_mask,
)
from erase.families import denoiser, denoiser_name, frozen_copy, hold_frozen, release_frozen
from erase.masked_adam import optimizer_state_bytes
from erase.objectives import training_scheduler
from erase.saliency import (
    load_mask,
    mask_fraction,
    save_mask,
)
from erase.sd import check_prompts_fit, denoiser_source, load_pipeline, pipeline_class
from erase.uce import UCEScales, uce_edit

FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")

logger = get_logger(__name__)

# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    # load_concept looked up here at call time: what a test may stand in for
    return parse_train_args(argv, "erase/train.py", __doc__.split("\n\n")[0], load=load_concept)


# ----------------------------------------------------------------------------- main


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since the last call (None off CUDA), then reset the peak."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def load_models(cfg: TrainConfig, device: torch.device, sharded: bool, weight_dtype: torch.dtype, autocast_dtype: torch.dtype | None):
    """(pipeline, the UNet or transformer it trains, ESD's frozen teacher or None, a note where a
    sharded run had to load the whole model on every process, else None).
    Sharded, each process holds its rows of the trained model (and of the teacher) from the start: they
    are read from the safetensors files row by row, so no process loads a whole copy (an SDXL UNet is
    10 GB in fp32); the image sets are then generated through the sharded model. Under bf16 the
    shards are gathered in bf16 (fp16 is refused), while the shards, the masters, stay fp32."""
    name, esd = cfg.pretrained_model_name_or_path, cfg.method.startswith("esd")
    trained_dtype = weight_dtype if cfg.master_weights == "masked" else torch.float32  # fp32 masters, or the mask's alone
    if sharded:
        cls, folder = denoiser_source(name)
        unet = sharding.load_sharded(cls, folder, device, trained_dtype, param_dtype=autocast_dtype,
                                     checkpointing=cfg.gradient_checkpointing)
        if unet is not None:
            pipe = load_pipeline(name, device="cpu", components={os.path.basename(folder): unet})
            teacher = sharding.load_sharded(cls, folder, device, weight_dtype).requires_grad_(False) if esd else None
            return pipe, unet, teacher, None
    pipe = load_pipeline(name, device="cpu")
    unet = denoiser(pipe).to(device, trained_dtype)
    teacher = frozen_copy(unet, weight_dtype) if esd else None  # stored in weight_dtype
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if not sharded:
        return pipe, unet, teacher, None
    sharding.shard_unet(unet, device, param_dtype=autocast_dtype)  # in place: from here each process holds its rows
    if teacher is not None:
        sharding.shard_unet(teacher, device)
    return pipe, unet, teacher, (f"{folder} holds no safetensors weights named as the model's: every process loaded "
                                 "the whole model before sharding it")


def train(cfg: TrainConfig) -> str:
    concepts = cfg.resolve_concepts()
    concept = merge_concepts(concepts)
    check_output_dir(cfg)
    staging = staging_dir(cfg.output_dir)
    report_to = cfg.report_to or ("tensorboard" if importlib.util.find_spec("tensorboard") else None)
    accelerator = Accelerator(
        # Why no cache: under FSDP2 a cast cached in the anchor's no-grad forward is reused by the
        # trained forward, and the sharded units get no gradient. A cast gives the same values either way.
        kwargs_handlers=[AutocastKwargs(cache_enabled=False)]
        + ([InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))] if cfg.ddp_timeout else []),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=staging, logging_dir=os.path.join(staging, "logs")),
    )
    device = accelerator.device
    check_launch(accelerator.num_processes)
    sharded = sharding.sharding_of(cfg, accelerator)
    if cfg.method == "uce":
        return edit_closed_form(cfg, concepts, accelerator, staging)
    checkpoint = latest_checkpoint(staging, cfg.resume_from_checkpoint)
    sharding.check_checkpoint_sharding(checkpoint, sharded, accelerator)
    notes = []  # what the run did other than asked, also in erase_config.json
    if cfg.resume_from_checkpoint == "latest" and checkpoint is None:
        notes.append(f"--resume-from-checkpoint latest found no checkpoint in {staging}: started afresh")
        logger.warning(notes[-1])
    if cfg.mixed_precision == "fp16" and not accelerator.native_amp:
        raise BadInput(f"--mixed-precision fp16 needs a GPU (this process runs on {device.type}); use bf16 or no")
    if checkpoint is None and os.path.isdir(staging) and accelerator.is_main_process:
        logger.warning(f"starting afresh: removing the unfinished run in {staging}")
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    # the frozen parts run in weight_dtype; the trained UNet keeps fp32 master weights (or, masked, its mask's alone)
    weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    autocast_dtype = weight_dtype if cfg.mixed_precision != "no" else None
    pipe, unet, frozen_unet, whole_copy = load_models(cfg, device, sharded, weight_dtype, autocast_dtype)
    host_peak_load = sharding.host_peak_bytes()  # this process's peak host memory while loading the models
    if whole_copy:
        notes.append(whole_copy)
        logger.warning(whole_copy)
    scheduler = training_scheduler(pipe.scheduler)
    given_mask = load_mask(cfg.mask, unet) if cfg.mask else None  # fail before any generation
    peaks: dict[str, float | None] = {}
    peak_memory_gib(device)
    start = time.perf_counter()
    originals = hold_frozen(pipe, device, weight_dtype)
    data = prepare_data(pipe, cfg, concepts, accelerator, autocast_dtype)
    adversary = text_encoders = None
    if cfg.adversarial:  # the inner attack encodes its captions: the text encoders stay held until training ends
        adversary = AdversarialTokens(pipe, cfg.adversarial_settings(), concepts)
        if cfg.adversarial_trains != "unet":
            text_encoders = TrainedTextEncoders(pipe, device, originals)
    else:
        release_frozen(pipe, originals)
    seconds_data = time.perf_counter() - start
    peaks["data"] = peak_memory_gib(device)

    start = time.perf_counter()
    mask = trainable_mask(unet, cfg, scheduler, data, accelerator, staging, given_mask, resume=checkpoint is not None,
                          adversary=adversary, sharded=sharded)
    seconds_mask = time.perf_counter() - start
    peaks["mask"] = peak_memory_gib(device)
    save_masks(mask, unet, staging, accelerator, sharded, metadata={"method": cfg.method, "concept": concept.name})

    optimizer = update = None
    if cfg.adversarial_trains != "text-encoder":
        optimizer, update = masked_optimizer(unet, mask, cfg.learning_rate, cfg.optimizer_state, sharded=sharded,
                                             masters=cfg.master_weights == "masked")
    else:
        unet.requires_grad_(False)
    if text_encoders is not None:
        optimizer = text_encoders.attach(optimizer, cfg.learning_rate)
    kept = mask_fraction(mask, sharded)
    del mask  # MaskedUpdate holds it bit-packed
    if sharded:  # FSDP2 is applied above; Accelerate wraps the optimizer only (gradient accumulation)
        optimizer = AcceleratedOptimizer(optimizer, device_placement=False)
        sizes = sharding.ShardSizes(unet, optimizer)
    elif cfg.adversarial_trains == "text-encoder":  # a UNet with nothing to train is not wrapped
        optimizer = accelerator.prepare(optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)

    first_step = 0
    if checkpoint:
        if sharded:
            sharding.load_training_state(checkpoint, unet, optimizer)
        else:
            accelerator.load_state(checkpoint)
        first_step = int(checkpoint.rstrip("/").rsplit("-", 1)[1])
        for state in (adversary, text_encoders):
            if state is not None:
                state.load(checkpoint)
        logger.info(f"resumed from {checkpoint}")
    if accelerator.is_main_process and report_to:
        accelerator.init_trackers("erase", config={k: v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, (int, float, str, bool))})

    progress = tqdm(range(cfg.max_train_steps), initial=first_step, desc=f"{cfg.method} {concept.name}",
                    disable=not accelerator.is_local_main_process)

    def after_step(done: int, logs: dict[str, float] | None) -> None:
        progress.update(1)
        if logs is not None:
            progress.set_postfix(**{k: f"{v:.4f}" for k, v in logs.items()})
            accelerator.log(logs, step=done)
        if cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0 and done < cfg.max_train_steps:
            save_checkpoint(accelerator, os.path.join(staging, "checkpoints", f"checkpoint-{done}"), (adversary, text_encoders),
                            (unet, optimizer) if sharded else None)

    start = time.perf_counter()
    logs = train_steps(accelerator, unet, optimizer, data, scheduler, cfg, frozen_unet=frozen_unet, first_step=first_step,
                       after_step=after_step, adversary=adversary, text_encoders=text_encoders)
    seconds_train = time.perf_counter() - start
    peaks["train"] = peak_memory_gib(device)
    progress.close()
    if update is not None:
        update.remove()
    if adversary is not None:
        release_frozen(pipe, originals)
    accelerator.wait_for_everyone()

    record = {}
    if sharded:  # every process takes part in gathering the weights and the sizes; the main one keeps them
        record["sharding"] = sizes.record(accelerator, optimizer_state_bytes(optimizer), host_peak_load) | {
            "loaded": "each process a whole copy, then sharded" if whole_copy else "each process its rows of the safetensors files"}
        state = sharding.full_state_dict(unet, keep=accelerator.is_main_process)
    if accelerator.is_main_process:
        setattr(pipe, denoiser_name(pipe), sharding.unsharded_copy(unet, state) if sharded else accelerator.unwrap_model(unet))
        record = run_record(cfg, concepts, accelerator, kept, notes) | record | {
            "final_losses": logs,
            "seconds": {"data": seconds_data, "mask": seconds_mask, "train": seconds_train},
            "peak_memory_gib": peaks,
            # the main process's peak host memory while loading the models, and over the whole run before saving
            "peak_host_memory_gib": {"load": host_peak_load / 2**30, "run": sharding.host_peak_bytes() / 2**30},
            "resumed_from": checkpoint,
            "optimizer": {"state": cfg.optimizer_state, "master_weights": cfg.master_weights,
                          "state_bytes": optimizer_state_bytes(optimizer)},
        }
        if adversary is not None:
            record["adversarial"] = {"settings": dataclasses.asdict(adversary.settings), "tokens": adversary.tokens,
                                     "captions": adversary.captions, "last_attack_loss": adversary.last_loss,
                                     "mask_loss": cfg.adversarial_mask if cfg.method == "salun" else None,
                                     "trains": cfg.adversarial_trains}
        publish(pipe, staging, cfg, record)
    accelerator.end_training()
    return cfg.output_dir


def run_record(cfg: TrainConfig, concepts, accelerator: Accelerator, kept: float, notes: list[str]) -> dict:
    """What erase_config.json says about every run; `concept` is the run's concepts as one."""
    return {
        "config": dataclasses.asdict(cfg),
        "concept": dataclasses.asdict(merge_concepts(concepts)),
        "concepts": [dataclasses.asdict(c) for c in concepts],
        "mask": {"trainable_fraction": kept, "file": "saliency_mask.safetensors"},
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "notes": notes,
        "versions": versions(),
    }


def edit_closed_form(cfg: TrainConfig, concepts, accelerator: Accelerator, staging: str) -> str:
    """`--method uce`: no image sets, no training loop. One process edits and publishes; the
    saved mask marks the edited projections (what a delta export carries)."""
    if accelerator.is_main_process:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
        concept = merge_concepts(concepts)
        start = time.perf_counter()
        pipe = load_pipeline(cfg.pretrained_model_name_or_path, device=accelerator.device)
        seconds_load = time.perf_counter() - start
        start = time.perf_counter()
        mask = uce_edit(pipe, concept.forget, concept.anchor, concept.retain,
                        UCEScales(lam=cfg.uce_lambda, erase=cfg.erase_scale, preserve=cfg.preserve_scale))
        seconds_edit = time.perf_counter() - start
        os.makedirs(staging)
        save_mask(mask, os.path.join(staging, "saliency_mask.safetensors"), metadata={"method": cfg.method, "concept": concept.name})
        record = run_record(cfg, concepts, accelerator, mask_fraction(mask), []) | {
            "seconds": {"load": seconds_load, "edit": seconds_edit},
            "edited": sorted(n for n, m in mask.items() if bool(m.any())),
        }
        publish(pipe, staging, cfg, record)
    accelerator.wait_for_everyone()
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


def check(argv: list[str] | None) -> TrainConfig:
    """Every input, before a model is loaded: the options, the concept, the output folder, the checkpoint."""
    cfg = parse_args(argv)
    concept = cfg.resolve_concept()
    cls = pipeline_class(cfg.pretrained_model_name_or_path)  # a supported pipeline, from its model_index.json alone
    check_prompts_fit(cfg.pretrained_model_name_or_path, [*concept.forget, *concept.anchor, *concept.retain])
    if cls.__name__ in FLOW_PIPELINES and cfg.adversarial_trains != "unet":
        raise ValueError(f"--adversarial-trains {cfg.adversarial_trains} is not supported on a {cls.__name__}: its T5 encoder "
                         "is not trained here; the outer step trains the transformer (--adversarial-trains unet)")
    check_output_dir(cfg)
    if cfg.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(cfg.resume_from_checkpoint):
        raise ValueError(f"checkpoint folder not found: {cfg.resume_from_checkpoint}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    quiet_libraries()

    def run(cfg: TrainConfig) -> None:
        out = train(cfg)
        print(f"erased {' + '.join(cfg.concept) or 'custom concept'} with {cfg.method}: {out}")

    return run_command(lambda: check(argv), run)


if __name__ == "__main__":
    sys.exit(main())
