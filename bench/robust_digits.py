"""Robustness of each erasure to the attacks, plain against `--adversarial`, on the embedded digits model.

For each concept, method (salun, rl, esd-x, esd-u; uce, which has no training loop, plain only) and
variant (plain, adversarial) and seed:
erase with `accelerate launch erase/train.py --model digits --concept C --method M [--adversarial]
--seed S` (timed, its peak resident memory read from the finished process), then
- the rate at which the erased model still shows the concept and the retained digit and colour
  accuracy (bench/erase_digits.py's `score`: 40 template prompts and the held-out paraphrases);
- FID on the digits classifier's features between the original's and the erased model's images
  of the 40 template prompts (same seeds);
- UnlearnDiffAtk's ASR and concept-inversion recovery at N = 1, 4, 8 token vectors, each learning
  from the original's images at other seeds (`--inversion-heldout`), through eval.attack.run_attack
  (what `python -m eval attack` runs), on 8 prompts of the concept, one image each.
The sweeps are reduced so that the grid fits on 2 CPU cores (the defaults below; the table says
which); `--headline` reruns the inversion with more steps on the first concept's salun cells.

    python bench/robust_digits.py --out bench/results/robust_digits.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from erase.concepts import load_concept
from erase.digits import COLOURS, DEFAULT_GUIDANCE, DEFAULT_STEPS, DIGIT_WORDS, load_digits_classifier, prompt_for
from erase.sd import generate, load_pipeline
from eval.attack import AttackOptions, run_attack
from eval.classes import evaluate_classes, load_task
from eval.fid import fid_from_images, make_fid
from eval.generate import Sample
from eval.judges import judge_for
from eval.stats import wilson

from common import line_plot, machine, mean_std_text, save_results  # bench/common.py (the scripts run from bench/)
from erase_digits import erase_command, erasure_metrics, score  # the same scoring as bench/erase_digits.py


def erase(concept: str, method: str, adversarial: bool, seed: int, out: str, args) -> dict:
    """The whole command's seconds and its peak resident memory (GiB, from the finished process)."""
    cmd = erase_command(concept, method + ("+adversarial" if adversarial else ""), seed, out, args.cache_dir, *args.erase_args.split(),
                        model=args.model)
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(f"erasure failed: {err.read()[-2000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss_gib": usage.ru_maxrss / 2**20}


def retained(concept: str, after: dict) -> dict[str, float]:
    """Mean accuracy on the digits and on the colours, each without the concept's own class."""
    target = load_concept(concept).target
    digits = [a for d, a in after["digit_accuracy"].items() if int(d) != target.get("digit")]
    colours = [a for c, a in after["colour_accuracy"].items() if c != target.get("colour")]
    return {"retained_digits": statistics.fmean(digits), "retained_colours": statistics.fmean(colours)}


def strict_scores(model: str, n: int) -> dict:
    """Per-class template accuracy under the strict judge (`--classifier digits-strict`: a logistic
    regression on the raw 8x8 digits that never saw a generated or augmented image)."""
    task = load_task("digits-strict")
    grid = [(d, c, s) for d in range(10) for c in range(len(COLOURS)) for s in range(n)]
    samples = [Sample(i, prompt_for(d, COLOURS[c]), s, DEFAULT_GUIDANCE, {"digit": d, "colour": c}) for i, (d, c, s) in enumerate(grid)]
    classes = evaluate_classes(load_pipeline(model), task, samples, DEFAULT_STEPS)
    return {"digit_accuracy": {str(d): classes["accuracy"][DIGIT_WORDS[d]] for d in range(10)},
            "colour_accuracy": dict(classes["colour_accuracy"])}


def strict_retained(concept: str, before: dict, after: dict) -> dict[str, float]:
    """The strict judge's mean accuracy on the other digits / colours, and the worst other class's change (points)."""
    target = load_concept(concept).target
    digits = [d for d in after["digit_accuracy"] if int(d) != target.get("digit")]
    colours = [c for c in after["colour_accuracy"] if c != target.get("colour")]
    changes = [after["digit_accuracy"][d] - before["digit_accuracy"][d] for d in digits] + \
              [after["colour_accuracy"][c] - before["colour_accuracy"][c] for c in colours]
    return {"strict_retained_digits": statistics.fmean(after["digit_accuracy"][d] for d in digits),
            "strict_retained_colours": statistics.fmean(after["colour_accuracy"][c] for c in colours),
            "strict_worst_change": min(changes)}


def template_images(model: str, n: int, first_seed: int = 0) -> list[np.ndarray]:
    pipe = load_pipeline(model)
    prompts = [prompt_for(d, c) for d in range(len(DIGIT_WORDS)) for c in COLOURS for _ in range(n)]
    seeds = [first_seed + s for _ in range(len(DIGIT_WORDS) * len(COLOURS)) for s in range(n)]
    return [np.asarray(im) for im in generate(pipe, prompts, seeds, DEFAULT_STEPS, DEFAULT_GUIDANCE)]


def attacks(model: str, concept_name: str, steps: int, vectors: list[int], args) -> dict:
    """UnlearnDiffAtk's ASR and the inversion's recovery at each N (library code paths)."""
    concept = load_concept(concept_name)
    prompts = list(dict.fromkeys(concept.forget + concept.eval))[: args.prompts]
    m = args.attack_images_per_prompt  # image j of prompt i: seed i + 1000 j (j = 0: the one-image protocol's seed)
    samples = [Sample(i * m + j, p, i + 1000 * j, DEFAULT_GUIDANCE) for i, p in enumerate(prompts) for j in range(m)]
    judge = judge_for(concept)
    out = {"attack_images": len(samples)}
    if args.uda_iterations:
        opts = AttackOptions(attack="unlearndiffatk", k=args.k, iterations=args.uda_iterations, timesteps=args.uda_timesteps,
                             weight_decay=0.0, num_inference_steps=DEFAULT_STEPS, seed=args.attack_seed)
        report = run_attack(args.model, model, samples, judge, opts, concept_name=concept.name, grid_prompts=0)
        out["unlearndiffatk_asr"] = report["asr"]
        out["unlearndiffatk_asr_count"] = report["by_threshold"][report["judge"]["deciding"]]["asr_count"]
        out["before_attack"] = report["asr_parts"]["before_attack"]
    for n in vectors:
        opts = AttackOptions(attack="inversion", inversion_vectors=n, inversion_steps=steps, inversion_heldout=True,
                             num_inference_steps=DEFAULT_STEPS, seed=args.attack_seed)
        report = run_attack(args.model, model, samples, judge, opts, concept_name=concept.name, grid_prompts=0)
        out[f"recovery_n{n}"], out[f"recovery_n{n}_count"] = report["recovery"], report["recovery_count"]
        out.setdefault("before_attack", report["asr_parts"]["before_attack"])
    return out


def markdown(result: dict) -> str:
    p = result["protocol"]
    vec = p["vectors"]
    lines = [
        f"# Erasures under attack on the embedded model `{result.get('model', 'digits')}`: plain against `--adversarial`",
        "",
        f"Rates in %, mean ± std over the seeds run. Shown: the concept's template prompts ({p['images_per_prompt']} images each)"
        " / its held-out paraphrases.",
        "Retained: mean accuracy on the digits / the colours other than the concept's own, by the project's CNN judge and by the strict "
        "judge (a logistic regression on the raw 8x8 digits that never saw a generated or augmented image), with its worst other "
        "class's change from the original (points). FID: digits-classifier features, the original's",
        f"images of the 40 template prompts ({p['fid_images_per_prompt']} seeds each) against the erased model's, same seeds"
        + (f" (the original against itself at other seeds: {result['fid_floor']:.1f})." if "fid_floor" in result else "."),
        f"UnlearnDiffAtk (reduced: k = {p['k']}, {p['uda_timesteps']} timesteps x {p['uda_iterations']} iterations) and",
        f"concept inversion ({p['inversion_steps']} steps, learned from other seeds) on {p['prompts']} prompts of the concept, "
        f"{p.get('attack_images_per_prompt', 1)} image(s) each" + (" (a one-run cell: the count of judged images and its 95% interval)."
                                                                   if p.get("attack_images_per_prompt", 1) > 1 else "."),
        "Time: the whole erasure command; memory: its peak resident set."
        + (f" Every erasure also took `{p['erase_args']}`." if p.get("erase_args") else ""),
        "",
        "| concept | method | seeds | shown: template / paraphrases | retained: digits / colours | retained, strict judge: digits / "
        "colours (worst class, points) | FID | UnlearnDiffAtk ASR | "
        + " | ".join(f"inversion N = {n}" for n in vec) + " | time (s) | peak RSS (GiB) |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(vec) + "---|---|",
    ]
    for row in result["rows"]:
        runs = row["runs"]
        if not runs:
            continue
        def pct(key: str) -> str:
            if not all(key in r for r in runs):
                return "–"
            if len(runs) == 1 and f"{key}_count" in runs[0]:  # one run: the count of n and its 95% interval
                k, total = runs[0][f"{key}_count"], runs[0]["attack_images"]
                low, high = wilson(k, total)
                return f"{100 * k / total:.1f} ({k}/{total}; {100 * low:.1f}-{100 * high:.1f})"
            return mean_std_text([100 * r[key] for r in runs])

        num = lambda key: mean_std_text([r[key] for r in runs]) if all(key in r for r in runs) else "–"
        lines.append(
            f"| {row['concept']} | {row['method']} | {len(runs)} | {pct('template_rate_after')} / {pct('paraphrase_rate_after')} | "
            f"{pct('retained_digits')} / {pct('retained_colours')} | "
            f"{pct('strict_retained_digits')} / {pct('strict_retained_colours')} ({pct('strict_worst_change')}) | "
            f"{num('fid')} | {pct('unlearndiffatk_asr')} | "
            + " | ".join(pct(f"recovery_n{n}") for n in vec) + f" | {num('seconds')} | {num('peak_rss_gib')} |")
    if result.get("headline"):
        h = result["headline"]
        lines += ["", f"**Saturated inversion** ({h['steps']} steps, learned from other seeds, seed 0 erasures of "
                  f"`{h['concept']}`): recovery in % by N.", "",
                  "| model | " + " | ".join(f"N = {n}" for n in h["vectors"]) + " |", "|---|" + "---|" * len(h["vectors"])]
        for name, cells in h["rows"].items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * cells[f'recovery_n{n}']:.1f}" for n in h["vectors"]) + " |")
        lines += ["", f"![recovery against N]({Path(result.get('out', 'robust_digits.json')).with_suffix('.png').name})"]
    concurrent = f" ({result['parts']} parts of the grid at once, one thread each; the longest part's time)" if result.get("parts") else ""
    lines += ["", f"Machine: {result['machine']}; wall time {result['wall_seconds'] / 60:.1f} min{concurrent}."]
    return "\n".join(lines) + "\n"


def plot_headline(result: dict, path: Path) -> None:
    """The headline's recovery against N, one line per model (beside the table)."""
    h = result.get("headline")
    if h and h["rows"]:
        line_plot({name: [(n, 100 * cells[f"recovery_n{n}"]) for n in h["vectors"]] for name, cells in h["rows"].items()},
                  path, "token vectors N", f"recovery % ({h['steps']} steps)")


def merge(parts: list[str], out: str) -> None:
    """One table from parts of the grid run at the same time (each process one thread): rows in the
    grid's order, the wall time of the longest part."""
    import json

    loaded = [json.loads(Path(p).read_text()) for p in parts]
    if any(p["protocol"] != loaded[0]["protocol"] or p.get("model") != loaded[0].get("model") for p in loaded):
        raise SystemExit("the parts were run with different protocols or models")
    order = {(c, m): i for i, (c, m) in enumerate((c, m) for c in ("seven", "red", "three") for m in (
        "salun", "salun + adversarial", "esd-x", "esd-x + adversarial", "rl", "rl + adversarial", "esd-u", "esd-u + adversarial", "uce"))}
    rows = sorted((r for p in loaded for r in p["rows"]), key=lambda r: order.get((r["concept"], r["method"]), len(order)))
    result = {**loaded[0], "out": out, "rows": rows, "seeds": {k: v for p in loaded for k, v in p["seeds"].items()},
              "wall_seconds": max(p["wall_seconds"] for p in loaded), "parts": len(loaded)}
    result["headline"] = next((p["headline"] for p in loaded if p.get("headline")), None)
    save_results(result, out, markdown(result))
    plot_headline(result, Path(out).with_suffix(".png"))
    print(Path(out).with_suffix(".md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits", choices=["digits", "digits-flow"],
                        help="the embedded UNet model, or its flow-matching twin (SD3 architecture)")
    parser.add_argument("--concepts", nargs="+", default=["seven", "red", "three"])
    parser.add_argument("--methods", nargs="+", default=["salun", "esd-x", "rl", "esd-u", "uce"])
    parser.add_argument("--seeds", nargs="+", default=["salun=3", "esd-x=3"], help="METHOD=N seeds (others: 1)")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--fid-images-per-prompt", type=int, default=4, help="160 images: more than the 128 features")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--attack-images-per-prompt", type=int, default=1,
                        help="judged images per attacked prompt (other seeds); 8 x 8 prompts: 64 per cell")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--uda-iterations", type=int, default=10, help="0: skip UnlearnDiffAtk")
    parser.add_argument("--uda-timesteps", type=int, default=3)
    parser.add_argument("--inversion-steps", type=int, default=300)
    parser.add_argument("--vectors", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--headline", type=int, default=1000, help="inversion steps of the headline rerun (0: none)")
    parser.add_argument("--attack-seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["plain", "adversarial"], choices=["plain", "adversarial"])
    parser.add_argument("--erase-args", default="", help="extra erase/train.py flags for every erasure (a quick check)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "erase-bench-cache"))
    parser.add_argument("--out", default="bench/results/robust_digits.json")
    parser.add_argument("--merge", nargs="+", metavar="PART.json", help="only merge grids run concurrently (same protocol) into --out")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    seeds = {m: 1 for m in args.methods} | {k: int(v) for k, v in (s.split("=") for s in args.seeds)}
    start = time.perf_counter()
    classifier = load_digits_classifier()
    n = args.images_per_prompt
    before = score(args.model, args.concepts, n, classifier)
    strict_before = strict_scores(args.model, n)
    fid_metric, fid_name = make_fid("digits", sync_on_compute=False)  # the digits classifier's features, for either model
    reference = template_images(args.model, args.fid_images_per_prompt)
    # the floor: the original against itself at other seeds (what FID reads for no change at all)
    fid_floor = fid_from_images(fid_metric, template_images(args.model, args.fid_images_per_prompt, first_seed=1000), reference)
    rows: list[dict] = []
    result: dict = {}

    def save() -> None:
        result.update({"out": args.out, "model": args.model,
                       "protocol": {k: getattr(args, k) for k in ("images_per_prompt", "fid_images_per_prompt", "prompts",
                                                                    "attack_images_per_prompt", "k", "uda_iterations", "uda_timesteps",
                                                                    "inversion_steps", "vectors", "attack_seed", "erase_args")}
                       | {"fid_features": fid_name},
                       "seeds": seeds, "before": before, "fid_floor": fid_floor, "rows": rows, "wall_seconds": time.perf_counter() - start,
                       "machine": machine()})
        save_results(result, args.out, markdown(result))
        plot_headline(result, Path(args.out).with_suffix(".png"))

    with tempfile.TemporaryDirectory() as tmp:
        for concept in args.concepts:
            for method in args.methods:
                for adversarial in [v == "adversarial" for v in args.variants if method != "uce" or v == "plain"]:  # uce: no loop
                    row = {"concept": concept, "method": method + (" + adversarial" if adversarial else ""), "runs": []}
                    rows.append(row)
                    for seed in range(seeds[method]):
                        out = os.path.join(tmp, f"{concept}-{method}-{int(adversarial)}-{seed}")
                        run = {"seed": seed, **erase(concept, method, adversarial, seed, out, args)}
                        after = score(out, [concept], n, classifier)
                        run |= erasure_metrics(concept, before, after)
                        run |= retained(concept, after)
                        run |= strict_retained(concept, strict_before, strict_scores(out, n))
                        run["fid"] = fid_from_images(fid_metric, template_images(out, args.fid_images_per_prompt), reference)
                        run |= attacks(out, concept, args.inversion_steps, args.vectors, args)
                        row["runs"].append(run)
                        save()
                        print(concept, row["method"], seed, {k: round(v, 3) for k, v in run.items() if isinstance(v, float)}, flush=True)
                        if args.headline and concept == args.concepts[0] and method == "salun" and seed == 0:
                            headline = result.setdefault("headline", {"concept": concept, "steps": args.headline,
                                                                      "vectors": args.vectors, "rows": {}})
                            cells = attacks(out, concept, args.headline, args.vectors, argparse.Namespace(**{**vars(args), "uda_iterations": 0}))
                            headline["rows"][row["method"]] = cells
                            save()
                            print("headline", row["method"], cells, flush=True)
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
