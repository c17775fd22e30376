"""The text-free inversion against the token inversion on the embedded digits model.

Plain SalUn erases "seven" (seed 0, the digits recipe); then, on 8 prompts of the concept x 8 seeds (64 judged
images), both attacks learn from the original's images at other seeds (300 steps each): the token inversion
with N = 1, 4, 8 vectors and the text-free inversion (`--attack textfree`: the conditioning itself). Each
recovery with its count and 95% interval.

    python bench/textfree_digits.py --out bench/results/textfree_digits.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

from erase.concepts import load_concept
from erase.digits import DEFAULT_GUIDANCE, DEFAULT_STEPS
from eval.attack import AttackOptions, run_attack
from eval.generate import Sample
from eval.judges import judge_for
from eval.stats import rate_text

from common import machine, save_results
from erase_digits import ROOT, erase_command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concept", default="seven")
    parser.add_argument("--adversarial", action="store_true", help="erase with --adversarial (the recipe) instead of plain SalUn")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--images-per-prompt", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "textfree_digits.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    concept = load_concept(args.concept)
    prompts = list(dict.fromkeys(concept.forget + concept.eval))[: args.prompts]
    m = args.images_per_prompt
    samples = [Sample(i * m + j, p, i + 1000 * j, DEFAULT_GUIDANCE) for i, p in enumerate(prompts) for j in range(m)]
    judge = judge_for(concept)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        erased = os.path.join(tmp, "erased")
        method = "salun+adversarial" if args.adversarial else "salun"
        subprocess.run(erase_command(args.concept, method, 0, erased, os.path.join(tmp, "cache")), check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        attacks = {f"token inversion, N = {n}": AttackOptions(attack="inversion", inversion_vectors=n, inversion_steps=args.steps,
                                                              inversion_heldout=True, num_inference_steps=DEFAULT_STEPS)
                   for n in (1, 4, 8)}
        attacks["text-free inversion"] = AttackOptions(attack="textfree", inversion_steps=args.steps, inversion_heldout=True,
                                                       num_inference_steps=DEFAULT_STEPS)
        for name, opts in attacks.items():
            began = time.perf_counter()
            report = run_attack("digits", erased, samples, judge, opts, concept_name=concept.name, grid_prompts=0)
            rows[name] = {"recovered": report["recovery_count"], "n": len(samples), "ci95": report["recovery_ci95"],
                          "seconds": round(time.perf_counter() - began, 1)}
            print(name, rows[name], flush=True)
    erasure = "salun --adversarial" if args.adversarial else "salun"
    result = {"command": f"python bench/textfree_digits.py --concept {args.concept} --steps {args.steps}"
                         + (" --adversarial" if args.adversarial else "") + f" --out {args.out}", "machine": machine(),
              "concept": args.concept, "erasure": f"{erasure}, seed 0, the digits recipe", "steps": args.steps, "rows": rows,
              "wall_seconds": round(time.perf_counter() - start, 1)}
    lines = [f"# Text-free against token inversion: {erasure} on \"{args.concept}\" (embedded digits model)", "",
             f"{args.prompts} prompts x {m} seeds = {len(samples)} judged images per attack; each attack learns from the original's "
             f"images at other seeds, {args.steps} steps.", "",
             "| attack | recovery (count of n; 95% interval) | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {rate_text(r['recovered'], r['n'])} | {r['seconds']} |" for name, r in rows.items()]
    lines += ["", f"Machine: {result['machine']}; wall time {result['wall_seconds'] / 60:.1f} min.", ""]
    save_results(result, args.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
