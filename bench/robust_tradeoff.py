"""Robustness against retained accuracy: SalUn's adversarial settings swept on one concept.

Each setting is `accelerate launch erase/train.py --model digits --concept C --method salun` with its
own flags (plain, `--adversarial` with its defaults, and stronger retain losses or other schedules),
scored as bench/robust_digits.py scores a cell: the retained digit and colour accuracy, FID on the
digits features, and concept-inversion recovery at N = 4 and 8 token vectors (300 steps, learned
from other seeds). The plot puts robustness (100 - the worse recovery) against the retained digits:
the curve a setting must beat. Seeds run as separate processes and merge:

    python bench/robust_tradeoff.py --concept three --seeds 0 --out /tmp/t0.json &
    python bench/robust_tradeoff.py --concept three --seeds 1 --out /tmp/t1.json
    python bench/robust_tradeoff.py --merge /tmp/t0.json /tmp/t1.json --out bench/results/robust_tradeoff.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from robust_digits import attacks, erase, retained, template_images

from erase.digits import load_digits_classifier
from eval.fid import fid_from_images, make_fid

from common import line_plot, machine, mean_std_text, save_results  # bench/common.py (the scripts run from bench/)
from erase_digits import erasure_metrics, score

ADV = "--adversarial"
SETTINGS = {  # name: erase/train.py flags on top of the concept file's recipe (beta 0.5; 3 under --adversarial)
    "plain": "",
    "adversarial": f"{ADV} --beta 0.5",  # the grid's setting, before the recipe's adversarial beta
    "adversarial, beta 1": f"{ADV} --beta 1",
    "adversarial, beta 2": f"{ADV} --beta 2",
    "adversarial, beta 4": f"{ADV} --beta 4",
    "adversarial, beta 3": f"{ADV} --beta 3",
    "adversarial, beta 4, 8 vectors": f"{ADV} --beta 4 --adversarial-vectors 8",
    "adversarial, beta 4, 60 inner steps": f"{ADV} --beta 4 --adversarial-steps 60",
    "adversarial, beta 4, every 5": f"{ADV} --beta 4 --adversarial-every 5",
    "adversarial, beta 4, lr 2e-4": f"{ADV} --beta 4 --learning-rate 2e-4",
    "adversarial, beta 4, 300 steps": f"{ADV} --beta 4 --max-train-steps 300",
    "adversarial, beta 3, lr 2e-4": f"{ADV} --beta 3 --learning-rate 2e-4",
    "adversarial, beta 4, pool 20": f"{ADV} --beta 4 --adversarial-pool 20",
    "adversarial, beta 3, pool 20": f"{ADV} --beta 3 --adversarial-pool 20",
    "adversarial, beta 3, pool 20, 8 vectors": f"{ADV} --beta 3 --adversarial-pool 20 --adversarial-vectors 8",
    "adversarial, beta 2, pool 20": f"{ADV} --beta 2 --adversarial-pool 20",
    "adversarial, every 20": f"{ADV} --beta 0.5 --adversarial-every 20",
    "adversarial, 2 vectors": f"{ADV} --beta 0.5 --adversarial-vectors 2",
    "adversarial, mask both": f"{ADV} --beta 0.5 --adversarial-mask both",
    "adversarial, text encoder": f"{ADV} --beta 0.5 --adversarial-trains text-encoder",
    "adversarial, UNet + text encoder": f"{ADV} --beta 0.5 --adversarial-trains both",
}


def markdown(result: dict) -> str:
    lines = [f"# Robustness against retained accuracy: SalUn settings on \"{result['concept']}\"", "",
             f"Seeds {', '.join(map(str, result['seeds']))}; mean ± std. Shown: how often the erased model still draws the concept "
             "(its template prompts / its held-out paraphrases, %). Retained: the other digits / the other colours (%). "
             f"Inversion: {result['inversion_steps']} steps, learned from other seeds, on {result['prompts']} prompts of the concept "
             "(% of images recovered). Robustness: 100 - the worse of N = 4 and N = 8.", "",
             "| setting | flags | seeds | shown: template / paraphrases | retained: digits / colours | FID | inversion N = 4 "
             "| inversion N = 8 | robustness | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in result["rows"].items():
        pct = lambda key: mean_std_text([100 * r[key] for r in runs])
        lines.append(f"| {name} | `{SETTINGS.get(name, '') or '(recipe)'}` | {len(runs)} | {pct('shown_template')} / {pct('shown_paraphrases')} | "
                     f"{pct('retained_digits')} / {pct('retained_colours')} | "
                     f"{mean_std_text([r['fid'] for r in runs])} | {pct('recovery_n4')} | {pct('recovery_n8')} | "
                     f"{mean_std_text([robustness(r) for r in runs])} | {mean_std_text([r['seconds'] for r in runs])} |")
    lines += ["", f"![robustness against retained digits]({Path(result['out']).with_suffix('.png').name})", "",
              f"Machine: {result['machine']}; wall time {result['wall_seconds'] / 60:.1f} min"
              + (f" (the longest of {result['parts']} parts, one thread each, two at a time on the 2 cores)." if result.get("parts") else ".")]
    return "\n".join(lines) + "\n"


def shown(concept: str, after: dict) -> dict[str, float]:
    """How often the erased model still shows the concept: its template prompts, its paraphrases."""
    rates = erasure_metrics(concept, after, after)  # only its `_after` rates are read
    return {"shown_template": rates["template_rate_after"], "shown_paraphrases": rates["paraphrase_rate_after"]}


def robustness(run: dict) -> float:
    return 100 * (1 - max(run["recovery_n4"], run["recovery_n8"]))


def plot(result: dict) -> None:
    """One point per seed and setting: the settings' trade-off, each setting a series."""
    series = {name: sorted((100 * r["retained_digits"], robustness(r)) for r in runs) for name, runs in result["rows"].items()}
    line_plot(series, Path(result["out"]).with_suffix(".png"), "retained other digits %", "robustness: 100 - recovery %",
              size=(480, 300), log_x=False, connect=False)


def merge(parts: list[str], out: str) -> None:
    loaded = [json.loads(Path(p).read_text()) for p in parts]
    rows: dict[str, list] = {}
    for part in loaded:
        for name, runs in part["rows"].items():
            rows.setdefault(name, []).extend(runs)
    result = {**loaded[0], "out": out, "rows": rows, "seeds": sorted(s for p in loaded for s in p["seeds"]),
              "wall_seconds": max(p["wall_seconds"] for p in loaded), "parts": len(loaded)}
    save_results(result, out, markdown(result))
    plot(result)
    print(markdown(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concept", default="three")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--fid-images-per-prompt", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--inversion-steps", type=int, default=300)
    parser.add_argument("--attack-seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "erase-bench-cache"))
    parser.add_argument("--merge", nargs="+", metavar="PART.json")
    parser.add_argument("--out", default="bench/results/robust_tradeoff.json")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    start = time.perf_counter()
    classifier = load_digits_classifier()
    fid_metric, _ = make_fid("digits", sync_on_compute=False)
    reference = template_images("digits", args.fid_images_per_prompt)
    attack_args = argparse.Namespace(prompts=args.prompts, uda_iterations=0, attack_seed=args.attack_seed)
    result = {"concept": args.concept, "seeds": args.seeds, "inversion_steps": args.inversion_steps, "prompts": args.prompts,
              "out": args.out, "rows": {}, "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            for seed in args.seeds:
                out = os.path.join(tmp, f"{len(result['rows'])}-{seed}")
                flags = SETTINGS[name].split()
                erase_args = argparse.Namespace(cache_dir=args.cache_dir, erase_args=" ".join(f for f in flags if f != ADV))
                run = {"seed": seed, **erase(args.concept, "salun", ADV in flags, seed, out, erase_args)}
                after = score(out, [args.concept], args.images_per_prompt, classifier)
                run |= retained(args.concept, after) | shown(args.concept, after)
                run["fid"] = fid_from_images(fid_metric, template_images(out, args.fid_images_per_prompt), reference)
                run |= attacks(out, args.concept, args.inversion_steps, [4, 8], attack_args)
                result["rows"].setdefault(name, []).append(run)
                result["wall_seconds"] = time.perf_counter() - start
                save_results(result, args.out, markdown(result))
                print(name, seed, {k: round(v, 3) for k, v in run.items() if isinstance(v, float)}, flush=True)
    plot(result)
    print(statistics.fmean(robustness(r) for runs in result["rows"].values() for r in runs))


if __name__ == "__main__":
    main()
