"""python -m eval classes|nudity|fid|compare|attack: evaluate a (possibly erased) text-to-image model.

    python -m eval classes --model digits --out classes.json
    python -m eval nudity --model DIR --prompts i2p.csv --out nudity.json
    python -m eval nudity --images DIR --out nudity.json
    python -m eval fid --model DIR --reference-model digits --out fid.json
    python -m eval compare digits DIR --out reports/erased
    python -m eval attack --model DIR --original digits --attack unlearndiffatk --out attack.json

`--model` takes `digits` (the embedded model), a pipeline folder or a hub id. Under
`accelerate launch -m eval ...` generation is sharded over the processes and gathered; the
main process writes the report (atomically: a failed run leaves no output behind).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

import torch

from erase.cli import (
    BadInput,
    add_dataclass_arguments,
    check_model,
    check_positive,
    check_launch,
    check_writable,
    one_line_errors,
    quiet_libraries,
    run_command,
)
from erase.digits import is_digits_model

logger = logging.getLogger("eval")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sampler_defaults(model: str, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """Steps and guidance: as given, else the model's (erase.sd.sampler_defaults)."""
    from erase.sd import sampler_defaults as defaults

    default_steps, default_guidance = defaults(model)
    return (steps or default_steps), (default_guidance if guidance is None else guidance)


# ----------------------------------------------------------------------------- commands


def run_classes(args, state) -> dict:
    from erase.sd import load_pipeline, resolve_model
    from eval.classes import class_samples, evaluate_classes, load_task

    steps, guidance = sampler_defaults(args.model, args.steps, args.guidance)
    pipe = load_pipeline(args.model, device=state.device, dtype=DTYPES[args.dtype])
    task = load_task(args.classifier, device=state.device, classifier_model=args.classifier_model)
    samples = class_samples(task, args.images_per_prompt, guidance, args.seed)
    report = evaluate_classes(pipe, task, samples, steps, batch_size=args.batch_size, height=args.resolution,
                              width=args.resolution, state=state)
    return report | {"classifier": task.name, "classes": task.heads, "prompts": [p for p, _ in task.prompts],
                     "seeds": [s.seed for s in samples], "seed_rule": "seed + prompt_index * images_per_prompt + k",
                     "images_per_prompt": args.images_per_prompt, "steps": steps, "guidance": guidance,
                     "resolution": args.resolution, "model": args.model, "model_path": resolve_model(args.model)}


def run_nudity(args, state) -> dict:
    from eval.generate import image_paths
    from eval.nudity import default_detector, protocol

    detector = default_detector()
    if args.images:
        from eval.nudity import score_images

        paths = image_paths(args.images)
        summary = score_images(paths, detector, state=state)
        source = {"source": "images", "images_dir": os.path.abspath(args.images)}
        return summary | {"protocol": protocol(detector) | source}
    return _nudity_generated(args, state, detector)


def _nudity_generated(args, state, detector) -> dict:
    from erase.atomic import shared_output_dir
    from erase.sd import load_pipeline, resolve_model
    from eval.nudity import evaluate_nudity, load_prompt_rows, prompt_samples, protocol

    steps, default_guidance = sampler_defaults(args.model, args.steps, None)
    rows, source = load_prompt_rows(args.prompts, args.category, args.limit)
    samples = prompt_samples(rows, args.images_per_prompt, args.guidance, args.seed, default_guidance)
    pipe = load_pipeline(args.model, device=state.device, dtype=DTYPES[args.dtype])
    with shared_output_dir(args.save_images, state) as save_dir:
        summary = evaluate_nudity(pipe, samples, steps, detector, batch_size=args.batch_size, height=args.resolution,
                                  width=args.resolution, save_dir=save_dir, state=state)
    guidance = args.guidance if args.guidance is not None else f"per row (evaluation_guidance), else {default_guidance}"
    return summary | {"protocol": protocol(detector) | source | {
        "source": "generated", "model": args.model, "model_path": resolve_model(args.model), "steps": steps,
        "guidance": guidance, "images_per_prompt": args.images_per_prompt, "resolution": args.resolution,
        "seed_rule": f"row seed (evaluation_seed) + k, else {args.seed} + row * images_per_prompt + k",
        "seeds": [s.seed for s in samples]}}


def run_fid(args, state) -> dict:
    from erase.sd import load_pipeline, resolve_model
    from eval.fid import evaluate_fid, make_fid
    from eval.generate import image_paths

    features = args.features or ("digits" if is_digits_model(args.model) else "inception")
    metric, feature_name = make_fid(features, device=state.device)  # fails early when the extra is missing
    reference_paths = image_paths(args.reference) if args.reference else None
    steps, guidance = sampler_defaults(args.model, args.steps, args.guidance)
    samples, prompts_source = _fid_samples(args, guidance)
    pipe = load_pipeline(args.model, device=state.device, dtype=DTYPES[args.dtype])
    reference_pipe = None if args.reference else load_pipeline(args.reference_model, device=state.device,
                                                               dtype=DTYPES[args.dtype])
    result = evaluate_fid(pipe, samples, steps, metric, reference_pipe=reference_pipe, reference_paths=reference_paths,
                          batch_size=args.batch_size, height=args.resolution, width=args.resolution, state=state)
    reference = ({"folder": os.path.abspath(args.reference)} if args.reference else
                 {"model": args.reference_model, "model_path": resolve_model(args.reference_model),
                  "same_prompts_and_seeds": True})
    return result | {"features": feature_name, "reference": reference, "model": args.model,
                     "model_path": resolve_model(args.model), "prompts": prompts_source,
                     "images_per_prompt": args.images_per_prompt, "steps": steps, "guidance": guidance,
                     "resolution": args.resolution, "seeds": [s.seed for s in samples]}


def _fid_samples(args, guidance: float):
    """Samples from --prompts, or every digits template prompt for a digits model."""
    from eval.nudity import load_prompt_rows, prompt_samples

    if args.prompts:
        rows, source = load_prompt_rows(args.prompts)
    elif is_digits_model(args.model):
        from erase.digits import COLOURS, DIGIT_WORDS, prompt_for

        rows = [{"prompt": prompt_for(d, c), "seed": None, "guidance": None, "categories": None}
                for d in range(len(DIGIT_WORDS)) for c in COLOURS]
        source = {"prompts_file": None, "prompts": "digits template, every digit in every colour"}
    else:
        raise BadInput("fid needs --prompts FILE (CSV or text) for a model other than digits")
    return prompt_samples(rows, args.images_per_prompt, guidance, args.seed, guidance), source


def run_compare(args, state) -> dict:
    from eval.report import CompareOptions, compare

    digits_like = is_digits_model(args.original)
    steps, guidance = sampler_defaults(args.original, args.steps, None)
    classifier = args.classifier or ("digits" if digits_like else None)
    metrics = args.metrics.split(",") if args.metrics else (["classes", "fid"] if classifier else ["nudity", "fid"])
    opts = CompareOptions(
        original=args.original, erased=args.erased, metrics=tuple(metrics), classifier=classifier or "digits",
        classifier_model=args.classifier_model, prompts=args.prompts, images_per_prompt=args.images_per_prompt,
        num_inference_steps=steps, guidance_scale=args.guidance, default_guidance=guidance, seed=args.seed,
        batch_size=args.batch_size, resolution=args.resolution, grid_prompts=args.grid_prompts,
        features=args.features or ("digits" if digits_like or classifier == "digits" else "inception"))
    return compare(opts, args.out, device=state.device, dtype=DTYPES[args.dtype], state=state)


def attack_concept(args):
    """The concept under attack: --concept, else the one the erased model's erase_config.json names."""
    import json
    from pathlib import Path

    from erase.concepts import load_concept
    from erase.sd import resolve_model

    name = args.concept
    if name is None:
        try:
            name = json.loads((Path(resolve_model(args.model)) / "erase_config.json").read_text())["concept"]["name"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"pass --concept (e.g. nudity): {args.model} has no erase_config.json naming its concept") from None
    return load_concept(name)


def attack_samples(args, concept, default_guidance: float, seed: int):
    """One sample per prompt: --prompts (CSV rows keep their seed and guidance), else the concept's
    forget and held-out prompts."""
    from eval.generate import Sample
    from eval.nudity import load_prompt_rows, prompt_samples

    if args.prompts:
        rows, source = load_prompt_rows(args.prompts, args.category, args.limit)
        return prompt_samples(rows, 1, args.guidance, seed, default_guidance), source
    prompts = list(dict.fromkeys(concept.forget + concept.eval))[: args.limit]
    guidance = default_guidance if args.guidance is None else args.guidance
    samples = [Sample(i, p, seed + i, guidance) for i, p in enumerate(prompts)]
    return samples, {"prompts_file": concept.source, "prompts": f"concept {concept.name}: forget + eval prompts",
                     "limit": args.limit, "num_prompts": len(samples)}


# AttackOptions fields the attack command spells its own way (a required choice; the model's steps)
ATTACK_OWN_OPTIONS = ("attack", "num_inference_steps")


def attack_options(args, steps: int, concept):
    """AttackOptions from the defaults, the --preset and the options given (their range checks run here)."""
    from dataclasses import fields

    from eval.attack import AttackOptions
    from eval.judges import judge_kind

    given = {f.name: getattr(args, f.name) for f in fields(AttackOptions) if hasattr(args, f.name)}
    return AttackOptions.from_preset(given | {"attack": args.attack, "num_inference_steps": steps},
                                     judge=judge_kind(concept), concept_name=concept.name)


def run_attack(args, state) -> dict:
    from erase.sd import pipeline_class, resolve_model
    from eval.judges import judge_for
    from eval.attack import run_attack as attack

    steps, guidance = sampler_defaults(args.original, args.steps, None)
    concept = attack_concept(args)
    opts = attack_options(args, steps, concept)
    samples, source = attack_samples(args, concept, guidance, opts.seed)
    for what in ("original", "model"):
        pipeline_class(getattr(args, what))  # a supported kind, before anything is generated
    judge = judge_for(concept, device=state.device, classifier_model=args.classifier_model)
    report = attack(args.original, args.model, samples, judge, opts, concept_name=concept.name,
                        device=state.device, dtype=DTYPES[args.dtype], height=args.resolution, state=state,
                        grid_prompts=args.grid_prompts)
    return report | {"model": args.model, "model_path": resolve_model(args.model), "original": args.original,
                     "original_path": resolve_model(args.original), "concept": concept.name, "prompts_source": source,
                     "resolution": args.resolution, "seed_rule": f"row seed, else {opts.seed} + row"}


def write_attack(report: dict, out: str) -> None:
    """FILE.json, with FILE.md (summary) and FILE.png (grid) beside it, each written atomically; for
    the inversion also FILE.safetensors, the learned token in the format `load_textual_inversion` reads."""
    from pathlib import Path

    from erase.atomic import replace_path, write_json
    from erase.cli import versions
    from eval.attack_report import attack_grid, attack_markdown, inversion_state_dict

    grid = attack_grid(report, max_prompts=len(report["images"]))
    out_path = Path(out)
    if grid is not None:
        replace_path(out_path.with_suffix(".png"), lambda tmp: grid.save(tmp, format="PNG"))
    if "inversion" in report:
        from safetensors.torch import save_file

        state = inversion_state_dict(report["inversion"])
        replace_path(out_path.with_suffix(".safetensors"), lambda tmp: save_file(state, str(tmp)))
    replace_path(out_path.with_suffix(".md"), lambda tmp: tmp.write_text(attack_markdown(report)))
    write_json({k: v for k, v in report.items() if k != "images"} | {"versions": versions()}, out)


COMMANDS = {"classes": run_classes, "nudity": run_nudity, "fid": run_fid, "compare": run_compare, "attack": run_attack}


# ----------------------------------------------------------------------------- arguments


def _sampling_args(p: argparse.ArgumentParser, images_per_prompt: int) -> None:
    p.add_argument("--images-per-prompt", type=int, default=images_per_prompt, help="images generated per prompt")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: 25 for digits, else 50)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: a CSV row's own, else 5 for digits, 7.5 otherwise)")
    p.add_argument("--seed", type=int, default=0, help="first seed of prompts without their own seed")
    p.add_argument("--batch-size", type=int, default=16, help="images per pipeline call")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classes", help="per-class accuracy of generated images")
    p.add_argument("--model", required=True, help="digits, a pipeline folder or a hub id")
    p.add_argument("--classifier", choices=["digits", "imagenette"], default="digits")
    p.add_argument("--classifier-model", default="microsoft/resnet-50", help="ImageNet classifier (imagenette)")
    p.add_argument("--out", required=True, help="JSON report to write")
    _sampling_args(p, 10)

    p = sub.add_parser("nudity", help="NudeNet counts on I2P prompts (or on an image folder)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="digits, a pipeline folder or a hub id")
    source.add_argument("--images", help="score this folder of images instead of generating")
    p.add_argument("--prompts", default="AIML-TUDA/i2p", help="I2P-format CSV (or the hub id, when online)")
    p.add_argument("--category", default=None, help="only I2P rows of this category (e.g. sexual)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--save-images", default=None, help="also write the generated images to this folder")
    p.add_argument("--out", required=True, help="JSON report to write")
    _sampling_args(p, 1)

    p = sub.add_parser("fid", help="FID against a reference folder or the original model")
    p.add_argument("--model", required=True, help="digits, a pipeline folder or a hub id")
    reference = p.add_mutually_exclusive_group(required=True)
    reference.add_argument("--reference", help="folder of reference images")
    reference.add_argument("--reference-model", help="render the same prompts and seeds with this model")
    p.add_argument("--prompts", default=None, help="CSV or text file (default for digits: every digit/colour)")
    p.add_argument("--features", choices=["inception", "digits"], default=None,
                   help="feature extractor (default: digits for the digits model, else inception)")
    p.add_argument("--out", required=True, help="JSON report to write")
    _sampling_args(p, 4)

    p = sub.add_parser("compare", help="before/after report of two models: JSON, Markdown, PNG grid")
    p.add_argument("original", help="the original model (digits, folder or hub id)")
    p.add_argument("erased", help="the erased model")
    p.add_argument("--prompts", default=None, help="CSV or text file (default for digits: the class prompts)")
    p.add_argument("--metrics", default=None, help="comma-separated: classes,nudity,fid")
    p.add_argument("--classifier", choices=["digits", "imagenette"], default=None)
    p.add_argument("--classifier-model", default="microsoft/resnet-50")
    p.add_argument("--features", choices=["inception", "digits"], default=None)
    p.add_argument("--grid-prompts", type=int, default=10, help="prompts shown in the image grid")
    p.add_argument("--out", required=True, help="output folder")
    _sampling_args(p, 4)

    p = sub.add_parser("attack", help="attack an erased model (UnlearnDiffAtk, concept inversion): success rate")
    p.add_argument("--model", required=True, help="the ERASED model (folder or hub id)")
    p.add_argument("--original", required=True, help="the ORIGINAL model, which draws the target images")
    p.add_argument("--attack", required=True, choices=["unlearndiffatk", "inversion"])
    p.add_argument("--concept", default=None,
                   help="concept name (default: the one the erased model's erase_config.json names); picks the judge")
    p.add_argument("--prompts", default=None, help="CSV or text file (default: the concept's forget + eval prompts)")
    p.add_argument("--category", default=None, help="only I2P rows of this category (e.g. sexual)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    from eval.attack import AttackOptions

    add_dataclass_arguments(p, AttackOptions, skip=ATTACK_OWN_OPTIONS, suppress=True)  # absent unless given: --preset fills them
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: 25 for digits, else 50)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: a CSV row's own, else 5 for digits, 7.5 otherwise)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--classifier-model", default=None, help="ImageNet classifier for object concepts")
    p.add_argument("--grid-prompts", type=int, default=8, help="prompts shown in the image grid (FILE.png)")
    p.add_argument("--out", required=True, help="JSON report to write (FILE.md and FILE.png beside it)")
    one_line_errors(parser)
    for p in sub.choices.values():
        one_line_errors(p)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every input of the command, before a model is loaded or an image generated."""
    check_positive(images_per_prompt=getattr(args, "images_per_prompt", None), batch_size=getattr(args, "batch_size", None),
                   steps=args.steps, resolution=args.resolution, limit=getattr(args, "limit", None),
                   grid_prompts=getattr(args, "grid_prompts", None))
    if args.guidance is not None and args.guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {args.guidance}")
    for what in ("model", "reference_model", "original", "erased"):
        if getattr(args, what, None):
            check_model(getattr(args, what), what.replace("_", " "))
    for what in ("images", "reference"):
        if getattr(args, what, None) and not os.path.isdir(getattr(args, what)):
            raise ValueError(f"image folder not found: {getattr(args, what)}")
    prompts = getattr(args, "prompts", None)
    if prompts and prompts.endswith((".csv", ".txt")) and not getattr(args, "images", None) and not os.path.isfile(prompts):
        raise ValueError(f"prompts file not found: {prompts}")
    if args.command == "attack":
        attack_options(args, args.steps or 1, attack_concept(args))  # its own range checks; the concept has a judge
    check_writable(args.out, "report", folder=args.command == "compare")
    if getattr(args, "save_images", None):
        check_writable(args.save_images, "image", folder=True)


def _headline(command: str, report: dict) -> str:
    if command == "classes":
        return f"overall accuracy {report['overall_accuracy']:.3f} ({report['num_images']} images)"
    if command == "nudity":
        return (f"flagged fraction {report['flagged_fraction']:.3f} ({report['num_images']} images), "
                f"counts {report['counts']}")
    if command == "fid":
        return (f"FID {report['fid']:.3f} ({report['features']} features, "
                f"{report['num_generated']} vs {report['num_reference']} images)")
    if command == "attack":
        parts = report["asr_parts"]
        line = (f"ASR {report['asr']:.3f} (before attack {parts['before_attack']:.3f} + attacked {parts['attacked']:.3f}, "
                f"{report['num_prompts']} prompts, {report['seconds_per_prompt']:.1f} s each)")
        return line + (f", inversion recovery {report['recovery']:.3f}" if "recovery" in report else "")
    return "report.json, report.md and grid.png written"


def check(argv: Sequence[str] | None) -> argparse.Namespace:
    args = parse_args(argv)
    check_args(args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: check(argv), run)


def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    quiet_libraries()
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Why the flag: `accelerate launch` passes "run on the CPU" in this variable, which only
    # Accelerator reads by itself; without it a CPU-only launch falls back to one process.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_launch(state.num_processes)
    start = time.time()
    report = COMMANDS[args.command](args, state)
    report |= {"num_processes": state.num_processes, "wall_seconds": round(time.time() - start, 1)}
    if state.is_main_process:
        if args.command == "attack":
            write_attack(report, args.out)
        elif args.command != "compare":
            from erase.atomic import write_json
            from erase.cli import versions

            write_json(report | {"versions": versions()}, args.out)
        print(f"{args.command}: {_headline(args.command, report)} -> {args.out}")
    state.wait_for_everyone()
    if state.num_processes > 1:
        state.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
