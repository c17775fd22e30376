"""python -m erase.digits --train [--flow] | --train-classifier: rebuild an embedded model or its classifier."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from erase.command import check_writable, one_line_errors, run_command
from erase.digits.build import DigitsTrainingOptions, train_pipeline
from erase.digits.flow import FlowTrainingOptions, train_flow_pipeline
from erase.digits.judge import ClassifierTrainingOptions, train_classifier
from erase.digits.paths import CLASSIFIER_PATH, FLOW_MODEL_DIR, MODEL_DIR


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run_command(lambda: check(argv), build)


def check(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = one_line_errors(argparse.ArgumentParser(prog="python -m erase.digits",
                                                     description="Rebuild the embedded digits model or its judging classifier."))
    parser.add_argument("--train", action="store_true", help="train the pipeline from scratch")
    parser.add_argument("--flow", action="store_true", help="with --train: digits-flow (SD3 architecture) instead of digits-sd")
    parser.add_argument("--train-classifier", action="store_true", help="train the judging classifier")
    parser.add_argument("--output-dir", help="pipeline folder to write (default: the shipped model's)")
    parser.add_argument("--classifier-out", default=str(CLASSIFIER_PATH), help="classifier file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-steps", type=int, help="denoiser steps (default: the model's recipe)")
    parser.add_argument("--vae-steps", type=int, default=DigitsTrainingOptions.vae_steps)
    args = parser.parse_args(argv)
    if not (args.train or args.train_classifier):
        parser.error("nothing to do: pass --train and/or --train-classifier")
    if args.flow and not args.train:
        parser.error("--flow needs --train")
    options = FlowTrainingOptions if args.flow else DigitsTrainingOptions
    args.output_dir = args.output_dir or str(FLOW_MODEL_DIR if args.flow else MODEL_DIR)
    steps = options.max_train_steps if args.max_train_steps is None else args.max_train_steps
    args.options = options(output_dir=args.output_dir, seed=args.seed, max_train_steps=steps,
                           vae_steps=args.vae_steps)  # its own range checks
    if args.train:
        check_writable(args.output_dir, "output", folder=True)
    if args.train_classifier:
        check_writable(args.classifier_out, "classifier")
    return args


def build(args: argparse.Namespace) -> None:
    if args.train:
        start = time.time()
        opts = args.options
        build_fn = train_flow_pipeline if isinstance(opts, FlowTrainingOptions) else train_pipeline
        print(f"pipeline written to {build_fn(opts)} in {time.time() - start:.0f} s")
    if args.train_classifier:
        start = time.time()
        train_classifier(ClassifierTrainingOptions(output_path=args.classifier_out, seed=args.seed))
        print(f"classifier written to {args.classifier_out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
