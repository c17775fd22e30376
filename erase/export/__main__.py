"""`python -m erase.export ERASED --format lora|single-file|delta --out FILE`: ship an erasure where users run models.

    python -m erase.export out/seven --format lora --out seven.lora.safetensors [--rank 8] [--layout kohya]
    python -m erase.export out/seven --format single-file --out seven.safetensors
    python -m erase.export out/seven --format delta --out seven.delta.safetensors

ERASED is a folder written by erase/train.py; the original model is read from its
erase_config.json unless --original names it. Every input is checked before a model is loaded,
and the file is written beside its target and renamed into place, so a failed export leaves none.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field

from erase.command import (
    add_dataclass_arguments,
    check_model,
    check_writable,
    one_line_errors,
    options_from,
    quiet_libraries,
    run_command,
)
from erase.export.lora import DEFAULT_RANK, LAYOUTS

logger = logging.getLogger("erase.export")

FORMATS = ("lora", "single-file", "delta")


@dataclass(kw_only=True)
class ExportOptions:
    """What `python -m erase.export` takes."""

    erased: str = field(metadata={"positional": True, "help": "folder written by erase/train.py"})
    format: str = field(metadata={"help": "lora (diffusers or kohya layout), single-file (original SD checkpoint) or delta "
                                          "(the changed tensors only)", "choices": FORMATS})
    out: str = field(metadata={"help": "the .safetensors file to write"})
    original: str | None = field(default=None, metadata={
        "help": "the model erased from: digits, a pipeline folder or a hub id (default: the one erase_config.json names)"})
    rank: str | None = field(default=None, metadata={
        "help": f"lora: rank of each layer's truncated SVD, an integer >= 1 or 'full' (default {DEFAULT_RANK})"})
    layout: str | None = field(default=None, metadata={
        "help": "lora: diffusers (pipe.load_lora_weights) or kohya (A1111, ComfyUI; default diffusers)", "choices": LAYOUTS})
    device: str = field(default="cpu", metadata={"help": "where weights are compared and factorised (cpu, cuda, ...)"})

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; choose from {', '.join(FORMATS)}")
        if self.format != "lora" and (self.rank is not None or self.layout is not None):
            raise ValueError("--rank and --layout apply to --format lora only")
        if self.format == "single-file" and self.original is not None:
            raise ValueError("--original applies to --format lora and delta (a single file holds the erased pipeline alone)")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; choose from {', '.join(LAYOUTS)}")
        if self.rank is not None and self.rank != "full" and not (self.rank.isdigit() and int(self.rank) >= 1):
            raise ValueError(f"rank must be an integer >= 1 or 'full', got {self.rank!r}")
        if not self.out.endswith(".safetensors"):
            raise ValueError(f"--out must name a .safetensors file (diffusers reads any other suffix as a pickle), got {self.out}")

    @property
    def max_rank(self) -> int | None:
        """The LoRA rank; None for full rank."""
        if self.rank == "full":
            return None
        return int(self.rank) if self.rank is not None else DEFAULT_RANK


def check(argv: list[str] | None, parser: argparse.ArgumentParser) -> tuple[ExportOptions, str]:
    """Every input, before any model is loaded: the options, the erased folder and its family, the
    original model, the output file. Returns the options and the original model's name."""
    from erase.export.weights import check_same_components, erased_source
    from erase.sd import pipeline_class

    opts = options_from(ExportOptions, parser.parse_args(argv))
    source = erased_source(opts.erased)
    family = pipeline_class(opts.erased).__name__
    if opts.layout == "kohya" and family == "StableDiffusion3Pipeline":  # not written yet
        raise ValueError("export --format lora --layout kohya is not supported for a StableDiffusion3Pipeline yet: use "
                         "--layout diffusers (load_lora_weights) or --format delta")
    original = opts.original or source
    if opts.format == "single-file":
        from erase.export.single_file import check_single_file
        from erase.export.single_file_flow import check_flux_width

        if family == "FluxPipeline":
            check_flux_width(opts.erased)
        elif family != "StableDiffusion3Pipeline":  # every SD3 / SD3.5 pipeline has an original layout
            check_single_file(opts.erased)
    else:
        try:
            check_model(original, "original model")
            pipeline_class(original)
        except ValueError as err:
            hint = "" if opts.original else f" (named by {opts.erased}/erase_config.json; give --original)"
            raise ValueError(f"{err}{hint}") from err
        check_same_components(opts.erased, original)
    check_writable(opts.out, "export")
    return opts, original


def export(opts: ExportOptions, original: str) -> dict:
    """Write the export; returns its report (also printed by the command)."""
    from erase.export.weights import erase_record

    metadata = {"erased": opts.erased, "original": original} | erase_record(opts.erased)
    if opts.format == "lora":
        from erase.export.lora import export_lora

        return export_lora(opts.erased, original, opts.out, opts.max_rank, opts.layout or "diffusers", opts.device, metadata)
    if opts.format == "single-file":
        from erase.export.single_file import export_single_file
        from erase.export.single_file_flow import export_single_file_flow
        from erase.sd import pipeline_class

        family = pipeline_class(opts.erased).__name__
        if family in ("StableDiffusion3Pipeline", "FluxPipeline"):
            return export_single_file_flow(opts.erased, opts.out, family == "FluxPipeline", metadata)
        return export_single_file(opts.erased, opts.out, metadata)
    from erase.export.delta import export_delta

    return export_delta(opts.erased, original, opts.out, opts.device, metadata)


def summary(report: dict, out: str) -> str:
    """One line of what was written."""
    size = f"{report['file_bytes'] / 2**20:.2f} MiB"
    if report["format"] == "lora":
        lost = report["energy_not_representable"]
        note = f"; {100 * lost:.2f}% of it is in bias/norm/embedding changes no LoRA carries, counted as not kept" if lost else ""
        return (f"lora ({report['layout']}, rank {report['rank']}, {report['layers']} layers): {size}, "
                f"{100 * report['energy_kept']:.2f}% of the change's energy kept{note} -> {out}")
    if report["format"] == "delta":
        return (f"delta: {report['tensors']} changed tensors ({report['dense_tensors']} whole, {report['sparse_tensors']} as "
                f"changed entries): {size} -> {out}")
    return f"single-file ({report['layout']}, {report['tensors']} tensors, round trip checked): {size} -> {out}"


def main(argv: list[str] | None = None) -> int:
    parser = one_line_errors(argparse.ArgumentParser(prog="python -m erase.export", description=__doc__.split("\n\n")[0]))
    add_dataclass_arguments(parser, ExportOptions)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)

    def run(checked: tuple[ExportOptions, str]) -> None:
        quiet_libraries(progress_bars=False)
        opts, original = checked
        print(summary(export(opts, original), opts.out))

    return run_command(lambda: check(argv, parser), run)


if __name__ == "__main__":
    sys.exit(main())
