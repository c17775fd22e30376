"""Several concepts erased in one run on the embedded digits model, against one run per concept.

For each method (salun, uce) and each set size k (1, 3, 5): erase the first k digits of --digits
in ONE run (`accelerate launch erase/train.py --concept A --concept B ...`), and each of those
digits alone (the same command with one --concept). Every model is scored by
bench/erase_digits.py's `score` (the 40 template prompts of every digit and colour, and the held-out
paraphrases of each erased digit, --images-per-prompt images each, the held-out digits
classifier). Per erased digit: how often it is still recognised, together and alone. Retained:
the mean accuracy on the 10 - k digits that no run of the set erased, and on the colours.

    python bench/multi_concept.py --out bench/results/multi_concept.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from erase.digits import COLOURS, DIGIT_WORDS, load_digits_classifier

from common import machine, save_results  # bench/common.py (the scripts run from bench/)
from erase_digits import erase_once, score  # the same command and scoring as bench/erase_digits.py


def retained(scored: dict, erased: list[str]) -> dict[str, float]:
    """Mean accuracy on the digits outside `erased`, and on every colour."""
    kept = [str(d) for d, word in enumerate(DIGIT_WORDS) if word not in erased]
    return {"digits": statistics.fmean(scored["digit_accuracy"][d] for d in kept),
            "colours": statistics.fmean(scored["colour_accuracy"][c] for c in COLOURS)}


def rates(scored: dict, name: str) -> dict[str, float]:
    return {"template": scored["digit_accuracy"][str(DIGIT_WORDS.index(name))], "paraphrases": scored["paraphrase_rate"][name]}


def markdown(result: dict) -> str:
    n = result["images_per_prompt"]
    lines = [
        "# Several concepts erased in one run (embedded digits model)",
        "",
        f"Scored on {n} images per template prompt (40) and per held-out paraphrase of each erased digit, seed 0 of",
        "erase/train.py. Rates in %: how often each erased digit is still recognised (template prompts / paraphrases),",
        "in the run that erased the whole set and in its own single-concept run. Retained: mean accuracy on the",
        "digits that no run of the set erased (original → the joint run; the single runs' mean in brackets), and",
        "on the four colours. Time: the whole `accelerate launch erase/train.py` command of the joint run.",
        "",
        "| method | erased at once | each erased digit: together (alone) | retained digits: original → together (alone) | "
        "colours: together (alone) | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    pct = lambda x: f"{100 * x:.1f}"
    for row in result["rows"]:
        each = ", ".join(f"{c} {pct(r['together']['template'])}/{pct(r['together']['paraphrases'])} "
                         f"({pct(r['alone']['template'])}/{pct(r['alone']['paraphrases'])})" for c, r in row["per_concept"].items())
        ret = row["retained"]
        lines.append(f"| {row['method']} | {len(row['concepts'])} | {each} | {pct(ret['original']['digits'])} → "
                     f"{pct(ret['together']['digits'])} ({pct(ret['alone']['digits'])}) | {pct(ret['together']['colours'])} "
                     f"({pct(ret['alone']['colours'])}) | {row['seconds']:.1f} |")
    lines += ["", f"Machine: {result['machine']}; wall time {result['wall_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", nargs="+", default=["seven", "two", "four", "zero", "nine"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 3, 5])
    parser.add_argument("--methods", nargs="+", default=["uce", "salun"])
    parser.add_argument("--images-per-prompt", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "erase-bench-cache"))
    parser.add_argument("--out", default="bench/results/multi_concept.json")
    args = parser.parse_args()
    if max(args.sizes) > len(args.digits) or min(args.sizes) < 1:
        parser.error(f"--sizes must lie in 1..{len(args.digits)} (the number of --digits)")
    start = time.perf_counter()
    classifier = load_digits_classifier()
    n = args.images_per_prompt
    original = score("digits", args.digits[: max(args.sizes)], n, classifier)
    rows: list[dict] = []

    def save() -> None:
        result = {"images_per_prompt": n, "seed": args.seed, "digits": args.digits, "original": original, "rows": rows,
                  "wall_seconds": time.perf_counter() - start, "machine": machine()}
        save_results(result, args.out, markdown(result))

    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            alone = {}  # each digit erased on its own: the reference for the joint runs
            for name in args.digits[: max(args.sizes)]:
                out = os.path.join(tmp, f"{method}-{name}")
                seconds = erase_once(name, method, args.seed, out, args)
                alone[name] = score(out, [name], n, classifier) | {"seconds": seconds}
                print(method, "alone", name, rates(alone[name], name), flush=True)
            for k in args.sizes:
                names = args.digits[:k]
                if k == 1:
                    together, seconds = alone[names[0]], alone[names[0]]["seconds"]
                else:
                    out = os.path.join(tmp, f"{method}-{k}")
                    seconds = erase_once(names, method, args.seed, out, args)
                    together = score(out, names, n, classifier)
                singles = [retained(alone[c], names) for c in names]
                rows.append({
                    "method": method, "concepts": names, "seconds": seconds,
                    "per_concept": {c: {"together": rates(together, c), "alone": rates(alone[c], c)} for c in names},
                    "retained": {"original": retained(original, names), "together": retained(together, names),
                                 "alone": {key: statistics.fmean(s[key] for s in singles) for key in ("digits", "colours")}},
                    "scores": together,
                })
                save()
                print(method, k, rows[-1]["per_concept"], rows[-1]["retained"], flush=True)
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
