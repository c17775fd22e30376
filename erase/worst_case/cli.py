"""`python -m erase.worst_case`: check the input, search, write the set (and the report)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import torch

from erase.atomic import write_json
from erase.command import add_dataclass_arguments, check_writable, one_line_errors, run_command
from erase.worst_case.classifier import run_classifier
from erase.worst_case.config import WorstCaseConfig
from erase.worst_case.prompt import run_prompt


def run(cfg: WorstCaseConfig, device: str | torch.device = "cpu", show_progress: bool = True) -> dict:
    if cfg.target == "prompt":
        return run_prompt(cfg, device, show_progress)
    return run_classifier(cfg, device, show_progress=show_progress)


def parse_args(argv: Sequence[str] | None = None) -> tuple[WorstCaseConfig, str, str | None]:
    parser = one_line_errors(argparse.ArgumentParser(prog="python -m erase.worst_case", description=__doc__.split("\n\n")[0]))
    add_dataclass_arguments(parser, WorstCaseConfig)
    parser.add_argument("--out", required=True, help="JSON list: training indices (data, class; a valid indices: file) or prompts")
    parser.add_argument("--report", default=None, help="optional JSON with w, the search history, timings and settings")
    args = vars(parser.parse_args(argv))
    out, report = args.pop("out"), args.pop("report")
    return WorstCaseConfig(**args), out, report


def check(argv: Sequence[str] | None) -> tuple[WorstCaseConfig, str, str | None]:
    cfg, out, report_path = parse_args(argv)
    check_writable(out, "output")
    if report_path:
        check_writable(report_path, "report")
    return cfg, out, report_path


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_command(lambda: check(argv), write_result)


def write_result(checked: tuple[WorstCaseConfig, str, str | None]) -> None:
    cfg, out, report_path = checked
    report = run(cfg)
    selected = report["prompts"] if cfg.target == "prompt" else report["indices"]
    write_json(selected, out)
    if report_path:
        write_json(report, report_path)
    moved = 1 - report["history"][-1]["overlap_with_start"] if report["history"] else 0.0
    print(f"worst-case {cfg.target} set: {report['size']} of {report['candidates']} items, {moved:.0%} changed from the "
          f"random start, {report['seconds']:.1f} s -> {out}")
