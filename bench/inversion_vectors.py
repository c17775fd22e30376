"""How much an inversion recovers as it gets stronger: N token vectors learned together, for S steps.

For each method (default: salun and uce) erase "seven" from the embedded digits model with
`accelerate launch erase/train.py` (seed 0), then run the library's concept inversion
(eval.attack.run_attack, what `python -m eval attack --attack inversion --inversion-vectors N
--inversion-steps S --inversion-heldout` runs) on 8 prompts of the concept, one image each: the
token vectors learn from the original's images at other seeds than the ones recovery is measured
on. Recovery = how often the erased model's image under the learned tokens is judged a seven by
the held-out digits classifier. The unerased model is the sanity row.

    python bench/inversion_vectors.py --out bench/results/inversion_vectors.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from erase.concepts import load_concept
from erase.digits import DEFAULT_GUIDANCE, DEFAULT_STEPS
from eval.attack import AttackOptions, run_attack
from eval.generate import Sample
from eval.judges import judge_for

from common import line_plot, machine, save_results  # bench/common.py (the scripts run from bench/)
from erase_digits import erase_once  # the same erasures as bench/erase_digits.py


def recovery(model: str, concept_name: str, vectors: int, steps: int, args) -> dict:
    concept = load_concept(concept_name)
    prompts = list(dict.fromkeys(concept.forget + concept.eval))[: args.prompts]
    samples = [Sample(i, p, i, DEFAULT_GUIDANCE) for i, p in enumerate(prompts)]
    opts = AttackOptions(attack="inversion", inversion_vectors=vectors, inversion_steps=steps, inversion_heldout=True,
                         num_inference_steps=DEFAULT_STEPS, seed=args.seed)
    begin = time.perf_counter()
    report = run_attack("digits", model, samples, judge_for(concept), opts, concept_name=concept.name, grid_prompts=0)
    return {"vectors": vectors, "steps": steps, "recovery": report["recovery"], "shown_before": report["asr_parts"]["before_attack"],
            "train_seconds": report["inversion"]["train_seconds"], "seconds": round(time.perf_counter() - begin, 1),
            "final_loss": report["inversion"]["loss_trace"][-1]}


def markdown(result: dict) -> str:
    steps = sorted({c["steps"] for row in result["rows"] for c in row["cells"]} | set(result["steps"]))
    lines = [
        "# Inversion recovery against token vectors N and steps S (embedded digits model, \"seven\")",
        "",
        f"{result['prompts']} prompts of the concept, one image each; the vectors learn from the original's images at",
        "other seeds (`--inversion-heldout`), lr 5e-3, batch 4, Adam, the mean embedding as start; recovery in % (the",
        "held-out digits classifier). Erasures: `erase/train.py --model digits --concept seven --method M --seed 0`.",
        "",
        "| model | N | " + " | ".join(f"S = {s}" for s in steps) + " | train (s) at the largest S |",
        "|---|---|" + "---|" * len(steps) + "---|",
    ]
    for row in result["rows"]:
        by_steps = {c["steps"]: c for c in row["cells"]}
        cells = [f"{100 * by_steps[s]['recovery']:.1f}" if s in by_steps else "not run" for s in steps]
        last = by_steps.get(max(steps))
        lines.append(f"| {row['model']} | {row['vectors']} | " + " | ".join(cells) + f" | {last['train_seconds'] if last else '-'} |")
    lines += ["", "![recovery against N](inversion_vectors.png)", "",
              f"Machine: {result['machine']}; wall time {result['wall_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Recovery against N at the largest S, one line per model (bench/results/inversion_vectors.png)."""
    top = max(result["steps"])
    series: dict[str, list[tuple[float, float]]] = {}
    for row in result["rows"]:
        for cell in row["cells"]:
            if cell["steps"] == top and row["model"] != "unerased (sanity)":
                series.setdefault(row["model"], []).append((row["vectors"], 100 * cell["recovery"]))
    if series:
        line_plot(series, path, "token vectors N", f"recovery % (S = {top})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["salun", "uce"])
    parser.add_argument("--vectors", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--steps", nargs="+", type=int, default=[300, 1000, 3000])
    parser.add_argument("--unerased-steps", type=int, default=300, help="steps of the sanity row (the unerased model)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "erase-bench-cache"))
    parser.add_argument("--out", default="bench/results/inversion_vectors.json")
    args = parser.parse_args()
    start = time.perf_counter()
    rows: list[dict] = []

    def save() -> None:
        result = {"prompts": args.prompts, "seed": args.seed, "steps": sorted(args.steps), "rows": rows,
                  "wall_seconds": time.perf_counter() - start, "machine": machine()}
        save_results(result, args.out, markdown(result))
        plot(result, Path(args.out).with_suffix(".png"))

    rows.append({"model": "unerased (sanity)", "vectors": 1, "cells": [recovery("digits", "seven", 1, args.unerased_steps, args)]})
    save()
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            out = os.path.join(tmp, method)
            erase_seconds = erase_once("seven", method, 0, out, args)
            for n in args.vectors:
                row = {"model": method, "vectors": n, "erase_seconds": erase_seconds, "cells": []}
                rows.append(row)
                for s in sorted(args.steps):
                    row["cells"].append(recovery(out, "seven", n, s, args))
                    save()
                    print(method, n, s, row["cells"][-1], flush=True)
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
