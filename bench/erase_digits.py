"""Erasure quality and time on the embedded digits model: salun, rl, esd-x, esd-u side by side.

For each concept (a digit and a colour), method and seed: `accelerate launch erase/train.py
--model digits --concept C --method M --seed S` (timed as a whole), then images for the 40
template prompts "a {colour} handwritten digit {word}" and for the concept's held-out
paraphrases, scored by the held-out digits classifier. Erasure is the fraction of the
concept's images still recognised as the concept; preservation is the accuracy on the others.

    python bench/erase_digits.py --seeds 3 --out bench/results/erase_digits.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from erase.concepts import load_concept
from erase.digits import (
    COLOURS,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    DIGIT_WORDS,
    classify_images,
    load_digits_classifier,
    prompt_for,
)
from erase.erasure import METHODS  # every method of erase/train.py, uce included
from erase.sd import generate, load_pipeline
from eval.classes import digits_task, evaluate_classes
from eval.generate import Sample

from common import machine, mean_std_text, save_results  # bench/common.py (the scripts run from bench/)

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = {"digits": "DDIM", "digits-flow": "flow-matching Euler"}  # each embedded model's scheduler



def score(model: str, concept_names: list[str], n: int, classifier) -> dict:
    """Per (digit, colour) template accuracy and, per concept, how often its paraphrases still show it."""
    pipe = load_pipeline(model)
    task = digits_task(classifier)
    grid = [(d, c, s) for d in range(10) for c in range(len(COLOURS)) for s in range(n)]
    samples = [Sample(i, prompt_for(d, COLOURS[c]), s, DEFAULT_GUIDANCE, {"digit": d, "colour": c}) for i, (d, c, s) in enumerate(grid)]
    classes = evaluate_classes(pipe, task, samples, DEFAULT_STEPS)  # eval's own engine and tally
    out = {
        "digit_accuracy": {str(d): classes["accuracy"][DIGIT_WORDS[d]] for d in range(10)},
        "colour_accuracy": dict(classes["colour_accuracy"]),
        "paraphrase_rate": {},
    }
    for name in concept_names:
        concept = load_concept(name)
        texts = [p for p in concept.eval for _ in range(n)]
        images = generate(pipe, texts, [s for _ in concept.eval for s in range(n)], DEFAULT_STEPS, DEFAULT_GUIDANCE)
        d_pred, c_pred = classify_images(images, classifier)
        hit = d_pred == concept.target["digit"] if "digit" in concept.target else c_pred == COLOURS.index(concept.target["colour"])
        out["paraphrase_rate"][name] = float(hit.float().mean())
    return out


def erasure_metrics(name: str, before: dict, after: dict) -> dict:
    """Rate at which the erased concept still appears, and the accuracy on everything else."""
    target = load_concept(name).target
    kind, value = ("digit", str(target["digit"])) if "digit" in target else ("colour", target["colour"])
    acc_b, acc_a = before[f"{kind}_accuracy"], after[f"{kind}_accuracy"]
    others = [k for k in acc_b if k != value]
    return {
        "template_rate_before": acc_b[value],
        "template_rate_after": acc_a[value],
        "paraphrase_rate_before": before["paraphrase_rate"][name],
        "paraphrase_rate_after": after["paraphrase_rate"][name],
        "others_accuracy_before": statistics.fmean(acc_b[k] for k in others),
        "others_accuracy_after": statistics.fmean(acc_a[k] for k in others),
        "others_drop_points": 100 * (statistics.fmean(acc_b[k] for k in others) - statistics.fmean(acc_a[k] for k in others)),
    }


def grid_arguments(parser: argparse.ArgumentParser) -> None:
    """Which erasures a digits benchmark runs, and where the image sets are cached between them."""
    parser.add_argument("--model", default="digits", choices=["digits", "digits-flow"],
                        help="the embedded UNet model, or its flow-matching twin (SD3 architecture)")
    parser.add_argument("--concepts", nargs="+", default=["seven", "red"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "erase-bench-cache"))


def erase_command(concept: str | list[str], method: str, seed: int, out: str, cache_dir: str, *extra: str,
                  model: str = "digits") -> list[str]:
    """`accelerate launch erase/train.py` on an embedded model (several concepts: one run; a method
    written `salun+adversarial` adds `--adversarial`)."""
    concepts = [concept] if isinstance(concept, str) else concept
    method, _, variant = method.partition("+")
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "erase" / "train.py"),
            "--model", model, *[a for c in concepts for a in ("--concept", c)], "--method", method,
            *(["--seed", str(seed)] if method != "uce" else []),
            "--output-dir", out, *(["--cache-dir", cache_dir] if method != "uce" else []),  # uce: no seed, nothing generated
            *(["--adversarial"] if variant == "adversarial" else []), *extra]


def erase_once(concept: str | list[str], method: str, seed: int, out: str, args) -> float:
    """Seconds of the whole erase_command."""
    cmd = erase_command(concept, method, seed, out, args.cache_dir, *getattr(args, "erase_args", "").split(), model=args.model)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"erasure failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def markdown(result: dict) -> str:
    lines = [
        f"# Erasing from the embedded model `{result.get('model', 'digits')}`",
        "",
        f"{result['images_per_prompt']} images per prompt and seed; {len(result['seeds'])} seeds; "
        f"{SAMPLERS[result.get('model', 'digits')]} {DEFAULT_STEPS} steps, guidance {DEFAULT_GUIDANCE}.",
        "Rates in %: how often images for the erased concept are still recognised as it (template prompts",
        "and held-out paraphrases), and the mean accuracy on the other digits (or colours) before and after.",
        "Time: the whole `accelerate launch erase/train.py` command (generation cached after the first run).",
        *([f"Flags over the concept file's recipe: `{result['erase_args']}`."] if result.get("erase_args") else []),
        "",
        "| concept | method | template before → after | paraphrases before → after | others before → after (drop, points) | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        runs = row["runs"]
        if not runs:
            continue
        pct = lambda key: mean_std_text([100 * r[key] for r in runs])
        lines.append(
            f"| {row['concept']} | {row['method']} | {pct('template_rate_before')} → {pct('template_rate_after')} | "
            f"{pct('paraphrase_rate_before')} → {pct('paraphrase_rate_after')} | {pct('others_accuracy_before')} → "
            f"{pct('others_accuracy_after')} ({mean_std_text([r['others_drop_points'] for r in runs])}) | "
            f"{mean_std_text([r['seconds'] for r in runs])} |"
        )
    edits = [f"{row['concept']} {r['phase_seconds']['edit']:.2f} s" for row in result["rows"] for r in row["runs"]
             if "edit" in r.get("phase_seconds", {})]
    if edits:
        lines += ["", "UCE's edit alone (erase_config.json `seconds.edit`): " + ", ".join(edits) + "."]
    lines += ["", f"Machine: {result['machine']}; wall time {result['wall_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    grid_arguments(parser)
    parser.add_argument("--images-per-prompt", type=int, default=5)
    parser.add_argument("--erase-args", default="", help="extra erase/train.py flags for every erasure (over the concept's recipe)")
    parser.add_argument("--out", default="bench/results/erase_digits.json")
    args = parser.parse_args()
    start = time.perf_counter()
    classifier = load_digits_classifier()
    before = score(args.model, args.concepts, args.images_per_prompt, classifier)
    rows: list[dict] = []

    def save() -> None:  # after every run, so an interrupted benchmark keeps what it measured
        result = {
            "model": args.model,
            "erase_args": args.erase_args,
            "images_per_prompt": args.images_per_prompt,
            "seeds": list(range(args.seeds)),
            "before": before,
            "recipe": {c: load_concept(c).train for c in args.concepts},
            "rows": rows,
            "wall_seconds": time.perf_counter() - start,
            "machine": machine(),
        }
        save_results(result, args.out, markdown(result))

    with tempfile.TemporaryDirectory() as tmp:
        for concept in args.concepts:
            for method in args.methods:
                row = {"concept": concept, "method": method, "runs": []}
                rows.append(row)
                for seed in range(args.seeds):
                    out = os.path.join(tmp, f"{concept}-{method}-{seed}")
                    seconds = erase_once(concept, method, seed, out, args)
                    phases = json.loads(Path(out, "erase_config.json").read_text()).get("seconds", {})  # e.g. uce's edit alone
                    after = score(out, [concept], args.images_per_prompt, classifier)
                    row["runs"].append({"seed": seed, "seconds": seconds, "phase_seconds": phases,
                                        **erasure_metrics(concept, before, after), "after": after})
                    save()
                    print(concept, method, seed, {k: round(v, 3) for k, v in row["runs"][-1].items() if isinstance(v, float)}, flush=True)
    print(Path(args.out).with_suffix(".md").read_text())

if __name__ == "__main__":
    main()
