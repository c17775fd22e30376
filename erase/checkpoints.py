"""The run folder of erase/train.py: the hidden staging folder beside the output, its masks and its
checkpoints (written to a temporary folder, then renamed), and finding the one to resume from."""

from __future__ import annotations

import os
import re

from accelerate import Accelerator

from erase import sharding
from erase.atomic import shared_output_dir
from erase.saliency import save_mask

__all__ = ["check_output_dir", "latest_checkpoint", "save_checkpoint", "save_masks", "staging_dir"]


def save_masks(mask, unet, staging: str, accelerator: Accelerator, sharded: bool, metadata: dict) -> None:
    """The whole mask in the run folder (what the published folder carries); sharded, each
    process's rows beside it too (what a resumed process reads back)."""
    if accelerator.is_main_process:
        os.makedirs(staging, exist_ok=True)
    accelerator.wait_for_everyone()
    if sharded:
        rank, world = accelerator.process_index, accelerator.num_processes
        save_mask(mask, sharding.shard_file(staging, "saliency_mask", rank, world), metadata | {"sharding": {"rank": rank, "world": world}})
        mask = sharding.gather_mask(mask, unet, keep=accelerator.is_main_process)
    if accelerator.is_main_process:
        save_mask(mask, os.path.join(staging, "saliency_mask.safetensors"), metadata=metadata)


def staging_dir(output_dir: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(output_dir)), "." + os.path.basename(os.path.abspath(output_dir)) + ".partial")


def check_output_dir(cfg) -> None:
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


def save_checkpoint(accelerator: Accelerator, folder: str, extra=(), sharded=None) -> None:
    """save_state into a temporary folder, then rename: a run killed mid-write leaves no
    half checkpoint for `--resume-from-checkpoint latest` to pick up. `extra`: what else an
    adversarial run saves (safetensors): the inner attack's vectors and moments, trained text
    encoders. `sharded`: (unet, optimizer), each process writing its own shards instead."""
    with shared_output_dir(folder, accelerator) as tmp:
        if sharded:
            sharding.save_training_state(tmp, *sharded)
        else:
            accelerator.save_state(str(tmp))
        for state in extra:
            if state is not None and accelerator.is_main_process:
                state.save(tmp)
