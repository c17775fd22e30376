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
from dataclasses import fields

import torch

from erase.command import BadInput, add_dataclass_arguments, check_launch, one_line_errors, options_from, quiet_libraries, run_command
from erase.digits import is_digits_model
from eval.options import COMMAND_OPTIONS, AttackCommand, check_inputs

logger = logging.getLogger("eval")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def steps_and_guidance(model: str, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """Steps and guidance: as given, else the model's (erase.sd.sampler_defaults)."""
    from erase.sd import sampler_defaults as defaults

    default_steps, default_guidance = defaults(model)
    return (steps or default_steps), (default_guidance if guidance is None else guidance)


# ----------------------------------------------------------------------------- commands


def run_classes(args, state) -> dict:
    from erase.sd import load_pipeline, resolve_model
    from eval.classes import class_samples, evaluate_classes, load_task

    steps, guidance = steps_and_guidance(args.model, args.steps, args.guidance)
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

    steps, default_guidance = steps_and_guidance(args.model, args.steps, None)
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
    steps, guidance = steps_and_guidance(args.model, args.steps, args.guidance)
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
    steps, guidance = steps_and_guidance(args.original, args.steps, None)
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
            record = json.loads((Path(resolve_model(args.model)) / "erase_config.json").read_text())
            names = [c["name"] for c in record.get("concepts") or [record["concept"]]]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"pass --concept (e.g. nudity): {args.model} has no erase_config.json naming its concept") from None
        if len(names) > 1:
            raise ValueError(f"{args.model} erased {len(names)} concepts ({', '.join(names)}): pass --concept NAME to attack one")
        name = names[0]
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
    from eval.attack import AttackOptions
    from eval.judges import judge_kind

    return AttackOptions.from_preset(args.given | {"attack": args.attack, "num_inference_steps": steps},
                                     judge=judge_kind(concept), concept_name=concept.name)


def run_attack(args, state) -> dict:
    from erase.sd import pipeline_class, resolve_model
    from eval.attack import run_attack as attack
    from eval.judges import judge_for

    steps, guidance = steps_and_guidance(args.original, args.steps, None)
    concept = attack_concept(args)
    opts = attack_options(args, steps, concept)
    samples, source = attack_samples(args, concept, guidance, opts.seed)
    for what in ("original", "model"):
        pipeline_class(getattr(args, what))  # a supported kind, before anything is generated
    judge = judge_for(concept, device=state.device, classifier_model=args.classifier_model)
    report = attack(args.original, args.model, samples, judge, opts, concept_name=concept.name,
                        device=state.device, dtype=DTYPES[args.dtype], height=args.resolution, state=state,
                        grid_prompts=args.grid_prompts)
    peak = torch.cuda.max_memory_allocated(state.device) / 2**30 if state.device.type == "cuda" else None
    return report | {"model": args.model, "model_path": resolve_model(args.model), "original": args.original,
                     "original_path": resolve_model(args.original), "concept": concept.name, "prompts_source": source,
                     "resolution": args.resolution, "seed_rule": f"row seed, else {opts.seed} + row",
                     "peak_memory_gib": peak}  # this process's peak allocated GPU memory (None off CUDA)


def write_attack(report: dict, out: str) -> None:
    """FILE.json, with FILE.md (summary) and FILE.png (grid) beside it, each written atomically; for
    the inversion also FILE.safetensors, the learned token in the format `load_textual_inversion` reads."""
    from pathlib import Path

    from erase.atomic import replace_path, write_json
    from erase.command import versions
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


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, object]:
    """(command, its options): every subcommand's options come from its dataclass in eval.options."""
    from eval.attack import AttackOptions

    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls in COMMAND_OPTIONS.items():
        p = sub.add_parser(name, help=cls.__doc__)
        add_dataclass_arguments(p, cls)
        if cls is AttackCommand:  # the attack's own settings, absent unless given: --preset fills them
            add_dataclass_arguments(p, AttackOptions, skip=ATTACK_OWN_OPTIONS, suppress=True)
        one_line_errors(p)
    one_line_errors(parser)
    namespace = parser.parse_args(argv)
    values = vars(namespace)
    if namespace.command == "attack":
        values["given"] = {f.name: values[f.name] for f in fields(AttackOptions) if f.name in values}
    return namespace.command, options_from(COMMAND_OPTIONS[namespace.command], values)


def check_args(command: str, opts) -> None:
    """Every input of the command, before a model is loaded or an image generated."""
    check_inputs(opts)
    if command == "attack":
        attack_options(opts, opts.steps or 1, attack_concept(opts))  # its own range checks; the concept has a judge


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


def check(argv: Sequence[str] | None) -> tuple[str, object]:
    command, opts = parse_args(argv)
    check_args(command, opts)
    return command, opts


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: check(argv), lambda checked: run(*checked))


def run(command: str, args) -> None:
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
    report = COMMANDS[command](args, state)
    report |= {"num_processes": state.num_processes, "wall_seconds": round(time.time() - start, 1)}
    if state.is_main_process:
        if command == "attack":
            write_attack(report, args.out)
        elif command != "compare":
            from erase.atomic import write_json
            from erase.command import versions

            write_json(report | {"versions": versions()}, args.out)
        print(f"{command}: {_headline(command, report)} -> {args.out}")
    state.wait_for_everyone()
    if state.num_processes > 1:
        state.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
