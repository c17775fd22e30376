"""Classifier unlearning, all methods side by side: digits, 10% random forgetting.

The learning rate of each method is chosen by a small grid search on a tuning seed that is
not among the reported seeds (the papers tune per method too); the chosen rate is then run
on `--seeds` fresh seeds (new split, forget set, original model and Retrain each). The gap
to Retrain is the mean absolute difference over UA, RA, TA and MIA-efficacy. A second
scenario, class-wise forgetting (`class:3`), runs beside it by default.

    python bench/classifier.py --seeds 3 --out bench/results/classifier.json
"""

from __future__ import annotations

import argparse
import time

import torch

from erase.classifier import UnlearnConfig, evaluate, load_dataset, parse_forget, train_original, unlearn

from common import METRICS, gap, machine, mean_std, save_results  # bench/common.py (the scripts run from bench/)

METHODS = ("ft", "ga", "rl", "l1-sparse", "salun")
LR_GRID = {
    "ft": [0.01, 0.03, 0.1, 0.2],
    "l1-sparse": [0.01, 0.03, 0.1, 0.2],
    "ga": [1e-3, 3e-3, 0.01, 0.03, 0.1],
    "rl": [5e-4, 1e-3, 2e-3, 5e-3, 0.01],
    "salun": [5e-4, 1e-3, 2e-3, 5e-3, 0.01],
}


def setup(seed: int, forget: str, args):
    """Data, forget set, original model (with its metrics) and Retrain result for one seed."""
    cfg = UnlearnConfig(dataset=args.dataset, forget=forget, method="retrain", seed=seed, epochs=args.epochs)
    data = load_dataset(cfg.dataset, seed=seed)
    forget_idx = parse_forget(cfg.forget, data.train_y, seed=seed)
    original = train_original(data, cfg)
    start = time.perf_counter()
    retrain_model = unlearn(original, data, forget_idx, cfg)
    retrain = {"metrics": evaluate(retrain_model, data, forget_idx), "seconds": time.perf_counter() - start}
    before = evaluate(original, data, forget_idx)
    no_unlearning = {"metrics": before, "gap": gap(before, retrain["metrics"]), "seconds": 0.0}
    return data, forget_idx, original, retrain, no_unlearning


def run_method(method: str, lr: float, seed: int, forget: str, ctx, args) -> dict:
    data, forget_idx, original, retrain, _ = ctx
    cfg = UnlearnConfig(dataset=args.dataset, forget=forget, method=method, lr=lr, seed=seed, epochs=args.epochs)
    start = time.perf_counter()
    model = unlearn(original, data, forget_idx, cfg)
    seconds = time.perf_counter() - start
    metrics = evaluate(model, data, forget_idx)
    return {"metrics": metrics, "gap": gap(metrics, retrain["metrics"]), "seconds": seconds}


def summarise(runs: list[dict]) -> dict:
    out = {k: mean_std([r["metrics"][k] for r in runs]) for k in METRICS}
    out["seconds"] = mean_std([r["seconds"] for r in runs])
    if "gap" in runs[0]:
        out["gap"] = mean_std([r["gap"] for r in runs])
    return out


def scenario(forget: str, args) -> dict:
    """Search each method's lr on the tuning seed, then run every method on the seeds."""
    tune_ctx = setup(args.tune_seed, forget, args)
    search = {m: {str(lr): run_method(m, lr, args.tune_seed, forget, tune_ctx, args)["gap"] for lr in LR_GRID[m]} for m in METHODS}
    chosen = {m: float(min(grid, key=grid.get)) for m, grid in search.items()}
    per_seed: dict[str, list[dict]] = {m: [] for m in ("retrain", "no unlearning", *METHODS)}
    for seed in range(args.seeds):
        ctx = setup(seed, forget, args)
        per_seed["retrain"].append(ctx[3])
        per_seed["no unlearning"].append(ctx[4])
        for m in METHODS:
            per_seed[m].append(run_method(m, chosen[m], seed, forget, ctx, args))
    summary = {m: summarise(runs) for m, runs in per_seed.items()}
    best = min(METHODS, key=lambda m: summary[m]["gap"]["mean"])
    return {"forget": forget, "lr_search_gap": search, "chosen_lr": chosen, "summary": summary, "per_seed": per_seed, "best_method": best}


def markdown(result: dict) -> str:
    lines = [
        f"# Classifier unlearning on {result['dataset']}, {len(result['seeds'])} seeds",
        "",
        "Mean ± std over seeds. Gap = mean |metric - Retrain| over UA, RA, TA, MIA (lower is better).",
        f"Learning rates chosen per method on tuning seed {result['tune_seed']} from the grids in bench/classifier.py;",
        f"{result['epochs']} unlearning epochs. 'no unlearning' is the original model, the floor any method must beat.",
    ]
    for sc in result["scenarios"]:
        lines += [
            "",
            f"## Forget {sc['forget']}",
            "",
            "| method | lr | UA | RA | TA | MIA | gap to Retrain | time (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, s in sc["summary"].items():
            cells = [f"{s[k]['mean']:.2f} ± {s[k]['std']:.2f}" for k in METRICS]
            gap_cell = f"{s['gap']['mean']:.2f} ± {s['gap']['std']:.2f}" if "gap" in s else "0 (reference)"
            lr = sc["chosen_lr"].get(method, "—")
            lines.append(f"| {method} | {lr} | " + " | ".join(cells) + f" | {gap_cell} | {s['seconds']['mean']:.1f} |")
        lines += ["", f"Smallest gap among {', '.join(METHODS)}: **{sc['best_method']}**."]
    lines += ["", f"Machine: {result['machine']}; wall time {result['wall_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tune-seed", type=int, default=100)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--forget", nargs="+", default=["random:0.1", "class:3"], help="one scenario per forget spec")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/classifier.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    scenarios = [scenario(forget, args) for forget in args.forget]
    result = {
        "dataset": args.dataset,
        "epochs": args.epochs,
        "seeds": list(range(args.seeds)),
        "tune_seed": args.tune_seed,
        "lr_grid": LR_GRID,
        "scenarios": scenarios,
        "wall_seconds": time.perf_counter() - start,
        "machine": machine(args.threads),
    }
    save_results(result, args.out, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
