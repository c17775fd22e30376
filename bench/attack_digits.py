"""Attacking erasures on the embedded digits model: is the concept gone, or only hidden?

For each concept (a digit and a colour), method (salun, rl, esd-x, esd-u) and seed: erase with
`accelerate launch erase/train.py --model digits --concept C --method M --seed S`, then run the
library's two attacks (eval.attack.run_attack, what `python -m eval attack` runs) on the
concept's forget and held-out prompts: the rate at which the erased model shows the concept
before any attack, the UnlearnDiffAtk attack success rate, the concept-inversion recovery, and
the attack time per prompt. The unerased model is the sanity row: both attacks should find the
concept there almost always.

UnlearnDiffAtk runs twice: with Adam's weight decay 0 (the headline column) and with the reference
attack's 0.1. Why: the decay is coupled (L2 added to the gradient), and a relaxed token over this
model's 147 words starts at 1/147 per entry, so 0.1 * theta (7e-4) is as large as the loss's own
gradient (1e-3, measured); over SD's 49,408 words the same term is 2e-6. With 0.1 the attack did
not lower its loss in tests/test_attack.py's setting; in attack success over the whole grid
neither setting is consistently stronger (bench/results/attack_digits.md).

    python bench/attack_digits.py --seeds 3 --out bench/results/attack_digits.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from erase.concepts import load_concept
from erase.digits import DEFAULT_GUIDANCE, DEFAULT_STEPS
from eval.attack import AttackOptions, run_attack
from eval.generate import Sample
from eval.judges import judge_for

from common import machine, mean_std_text, save_results  # bench/common.py (the scripts run from bench/)
from erase_digits import erase_once, grid_arguments  # the same erasures as bench/erase_digits.py


def attack_both(model: str, concept_name: str, args) -> dict:
    """Both attacks on `model`; the rates, and seconds per attacked prompt."""
    concept = load_concept(concept_name)
    prompts = list(dict.fromkeys(concept.forget + concept.eval))[: args.prompts]
    samples = [Sample(i, p, i, DEFAULT_GUIDANCE) for i, p in enumerate(prompts)]
    judge = judge_for(concept)
    out = {}
    runs = [("unlearndiffatk", args.weight_decay), ("inversion", 0.0)] + [("unlearndiffatk", 0.1)] * args.reference_decay
    for attack, decay in runs:
        key = attack if attack == "inversion" or decay == args.weight_decay else f"{attack}_wd{decay}"
        opts = AttackOptions(attack=attack, k=args.k, iterations=args.iterations, timesteps=args.timesteps,
                             weight_decay=decay, inversion_steps=args.inversion_steps, num_inference_steps=DEFAULT_STEPS,
                             seed=args.seed)
        report = run_attack("digits", model, samples, judge, opts, concept_name=concept.name, grid_prompts=0)
        attacked = [p["seconds"] for p in report["prompts"] if not p["before"]["shown"][judge.primary]]
        out[key] = {"asr": report["asr"], "before_attack": report["asr_parts"]["before_attack"],
                       "attacked": report["asr_parts"]["attacked"], "recovery": report.get("recovery"),
                       "seconds_per_attacked_prompt": statistics.fmean(attacked) if attacked else None,
                       "train_seconds": report.get("inversion", {}).get("train_seconds"),
                       "adversarial_prompts": [p.get("adversarial_prompt") for p in report["prompts"] if p.get("attacked")]}
    return {"before_attack": out["unlearndiffatk"]["before_attack"], "unlearndiffatk_asr": out["unlearndiffatk"]["asr"],
            "unlearndiffatk_attacked": out["unlearndiffatk"]["attacked"], "inversion_recovery": out["inversion"]["recovery"],
            "unlearndiffatk_asr_reference_decay": out.get("unlearndiffatk_wd0.1", {}).get("asr"),
            "unlearndiffatk_seconds_per_attacked_prompt": out["unlearndiffatk"]["seconds_per_attacked_prompt"],
            "inversion_train_seconds": out["inversion"]["train_seconds"], "details": out}


def cell(values: list[float | None], scale: float = 100.0) -> str:
    """mean ± std of the measured values (rates in %), or – where none was measured."""
    values = [v * scale for v in values if v is not None]
    return mean_std_text(values) if values else "–"


def markdown(result: dict) -> str:
    p = result["protocol"]
    lines = [
        "# Attacking erasures of the embedded digits model",
        "",
        f"{p['prompts']} prompts per concept (its forget prompts, then held-out paraphrases), one image each, "
        f"{len(result['seeds'])} seeds per method. UnlearnDiffAtk: k = {p['k']} tokens, {p['timesteps']} timesteps "
        f"x {p['iterations']} Adam iterations (lr 0.01, weight decay {p['weight_decay']}; the reference's 0.1 in its own column), "
        "stop at the first image the digits "
        f"classifier judges as the concept. Concept inversion: {p['inversion_steps']} textual-inversion steps on the "
        "original model's images of the prompts, then one image per prompt with the learned token.",
        "Rates in % (mean ± sd over seeds). ASR = shown before attack + attacked successfully.",
        "",
        "| concept | model | shown before attack | UnlearnDiffAtk ASR | UnlearnDiffAtk ASR, decay 0.1 | inversion recovery | "
        "UnlearnDiffAtk s / attacked prompt | inversion training (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        runs = row["runs"]
        if not runs:
            continue
        lines.append(
            f"| {row['concept']} | {row['method']} | {cell([r['before_attack'] for r in runs])} | "
            f"{cell([r['unlearndiffatk_asr'] for r in runs])} | {cell([r['unlearndiffatk_asr_reference_decay'] for r in runs])} | "
            f"{cell([r['inversion_recovery'] for r in runs])} | "
            f"{cell([r['unlearndiffatk_seconds_per_attacked_prompt'] for r in runs], 1.0)} | "
            f"{cell([r['inversion_train_seconds'] for r in runs], 1.0)} |")
    lines += ["", f"Machine: {result['machine']}; wall time {result['wall_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    grid_arguments(parser)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per concept")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--timesteps", type=int, default=5)
    parser.add_argument("--weight-decay", type=float, default=0.0, help="UnlearnDiffAtk's Adam weight decay (headline)")
    parser.add_argument("--reference-decay", action=argparse.BooleanOptionalAction, default=True,
                        help="also run UnlearnDiffAtk with the reference's weight decay 0.1")
    parser.add_argument("--inversion-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="the attacks' seed")
    parser.add_argument("--out", default="bench/results/attack_digits.json")
    args = parser.parse_args()
    start = time.perf_counter()
    rows: list[dict] = []

    def save() -> None:  # after every run, so an interrupted benchmark keeps what it measured
        result = {"protocol": {k: getattr(args, k) for k in ("prompts", "k", "iterations", "timesteps",
                                                              "weight_decay", "reference_decay", "inversion_steps", "seed")},
                  "seeds": list(range(args.seeds)), "rows": rows, "wall_seconds": time.perf_counter() - start,
                  "machine": machine()}
        save_results(result, args.out, markdown(result))

    with tempfile.TemporaryDirectory() as tmp:
        for concept in args.concepts:
            row = {"concept": concept, "method": "none (unerased)", "runs": [attack_both("digits", concept, args)]}
            rows.append(row)
            save()
            print(concept, "unerased", {k: v for k, v in row["runs"][-1].items() if k != "details"}, flush=True)
            for method in args.methods:
                row = {"concept": concept, "method": method, "runs": []}
                rows.append(row)
                for seed in range(args.seeds):
                    out = os.path.join(tmp, f"{concept}-{method}-{seed}")
                    seconds = erase_once(concept, method, seed, out, args)
                    row["runs"].append({"seed": seed, "erase_seconds": seconds, **attack_both(out, concept, args)})
                    save()
                    print(concept, method, seed, {k: v for k, v in row["runs"][-1].items() if k != "details"}, flush=True)
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
