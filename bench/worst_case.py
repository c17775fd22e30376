"""Worst-case vs random forget sets ("Challenging Forgets", Fan et al., ECCV 2024).

Data-wise (digits, 10%): for each seed, the original model is trained, a random 10% forget set
is drawn (the search's start), and for each method (FT, RL, SalUn) the worst-case set is
searched with that method as the lower level; the method then unlearns both sets with the
toolkit's default settings (erase.classifier.DEFAULT_LR, 10 epochs), and Retrain is run on
each set for the gap. "Harder" is counted per seed four ways: lower UA at equal RA (RA within
0.5 points), lower UA with RA no higher, a larger gap to Retrain, a lower forget-set
cross-entropy after unlearning.

This runs on clean digits and on digits with 10% and 20% of the training labels flipped
(`--label-noise 0 0.1 0.2`; erase.classifier.with_label_noise). Clean digits has almost nothing that
only memorisation fits: Retrain forgets about 1% of a random forget set and FT nothing, so
FT's UA is 0 on every set and cannot drop. With flipped labels the random set holds memorised
samples, as a CIFAR-10 forget set does, and FT forgets some of them. A last table (FT and Retrain
on random sets at `--sweep-noise` rates) shows how FT's forgetting depends on the noise rate.

Prompt-wise (the embedded digits model, if its weights are present): among the 40 prompts
"a {colour} handwritten digit {word}", the m hardest to erase are searched (SalUn lower level;
upper loss `denoising`, the paper's, and `contrast`); then SalUn erases those m prompts, and the
random m the search started from, with the same budget (erase/train.py's own loop, erase.erasure:
SalUn under a saliency mask, Adam); the held-out digits classifier scores images of the forget prompts (UA: % not
showing the prompt's digit in its colour) and of the other prompts (RA).

    python bench/worst_case.py --seeds 5 --out bench/results/worst_case.json
    python bench/worst_case.py --seeds 5 --skip-prompt --keep-prompt-from bench/results/worst_case.json  # data-wise only
    python bench/worst_case.py --render  # re-summarise the JSON at --out from its per-seed numbers, rewrite its Markdown
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from erase.classifier import UnlearnConfig, accuracy, evaluate, load_dataset, parse_forget, train_original, unlearn
from erase.worst_case import WorstCaseConfig, build_prompt_problem, classifier_problem, digits_candidates, random_start, resolve_size, search

from common import METRICS, gap, machine, mean_std, save_results  # bench/common.py (the scripts run from bench/)

DATA_METHODS = ("ft", "rl", "salun")
EQUAL_RA = 0.5  # points


# ----------------------------------------------------------------------------- data-wise


@torch.no_grad()
def forget_ce(model, data, idx) -> float:
    model.eval()
    return float(F.cross_entropy(model(data.train_x[idx]), data.train_y[idx]))


def unlearn_and_score(original, data, idx, method: str, seed: int, epochs: int) -> dict:
    cfg = UnlearnConfig(method=method, seed=seed, epochs=epochs)
    start = time.perf_counter()
    model = unlearn(original, data, idx, cfg)
    seconds = time.perf_counter() - start
    return {"metrics": evaluate(model, data, idx), "forget_ce": forget_ce(model, data, idx), "seconds": seconds}


def mislabeled(data, idx: torch.Tensor) -> int:
    return int(torch.isin(idx, data.mislabeled).sum())


def random_set_seed(seed: int, label_noise: float, args):
    """The data, the original model, the random forget set and Retrain on it."""
    data = load_dataset("digits", seed=seed, label_noise=label_noise)
    original = train_original(data, UnlearnConfig(method="retrain", seed=seed))
    random_idx = parse_forget(f"random:{args.fraction}", data.train_y, seed=seed)
    retrain_random = unlearn_and_score(original, data, random_idx, "retrain", seed, args.epochs)
    return data, original, random_idx, retrain_random


def data_seed(seed: int, label_noise: float, args) -> dict:
    """One seed: original model, the random set, and per method a worst-case search and both unlearnings."""
    data, original, random_idx, retrain_random = random_set_seed(seed, label_noise, args)
    out = {"seed": seed, "original_forget_ce_random": forget_ce(original, data, random_idx),
           "original_TA": accuracy(original, data.test_x, data.test_y), "mislabeled_random": mislabeled(data, random_idx),
           "retrain_random": retrain_random["metrics"], "methods": {}}
    for variant in args.variants:
        method, _, hyper = variant.partition(":")
        cfg = WorstCaseConfig(target="data", size=str(args.fraction), method=method, seed=seed, label_noise=label_noise,
                              outer_steps=args.outer_steps, hypergradient=hyper or "direct")
        problem = classifier_problem(cfg, data, original)
        m = resolve_size(cfg.size, problem.num_items)
        result = search(problem, m, cfg.search_options(show_progress=False), random_start(problem.num_items, m, seed))
        assert result.start == random_idx.tolist(), "the search starts at the random set"
        worst_idx = torch.tensor(result.selected)
        retrain_worst = unlearn_and_score(original, data, worst_idx, "retrain", seed, args.epochs)
        runs = {"random": unlearn_and_score(original, data, random_idx, method, seed, args.epochs),
                "worst": unlearn_and_score(original, data, worst_idx, method, seed, args.epochs)}
        for name, run, ref in (("random", runs["random"], retrain_random), ("worst", runs["worst"], retrain_worst)):
            run["gap"] = gap(run["metrics"], ref["metrics"])
            run["retrain"] = ref["metrics"]
        out["methods"][variant] = {
            **runs,
            "search_seconds": result.seconds,
            "search_cost_vs_unlearning": result.seconds / runs["random"]["seconds"],
            "overlap_with_random": 1 - len(set(result.selected) - set(result.start)) / m,
            "original_forget_ce_worst": forget_ce(original, data, worst_idx),
            "mislabeled_worst": mislabeled(data, worst_idx),
            "class_histogram_worst": torch.bincount(data.train_y[worst_idx], minlength=10).tolist(),
            "upper_objective": [h["upper_objective"] for h in result.history],
        }
        print(f"  noise {label_noise:g} seed {seed} {variant}: UA random {runs['random']['metrics']['UA']:.2f} "
              f"worst {runs['worst']['metrics']['UA']:.2f}, "
              f"search {result.seconds:.1f} s", flush=True)
    return out


def harder(random: dict, worst: dict) -> dict[str, bool]:
    """Per seed: lower UA at equal RA (within EQUAL_RA either way); lower UA with RA no higher (not higher by
    any amount: the method is no better on the retain set either, so the lower UA is not a trade for RA);
    a larger gap; a lower forget CE."""
    ua_lower = worst["metrics"]["UA"] < random["metrics"]["UA"]
    ra_change = worst["metrics"]["RA"] - random["metrics"]["RA"]
    return {"lower_UA_at_equal_RA": ua_lower and abs(ra_change) <= EQUAL_RA,
            "lower_UA_no_more_RA": ua_lower and ra_change <= 1e-9,  # RA no higher at all (1e-9: float noise only)
            "larger_gap": worst["gap"] > random["gap"], "lower_forget_ce": worst["forget_ce"] < random["forget_ce"]}


def summarise_data(seeds: list[dict], variants: list[str]) -> dict:
    summary = {}
    for variant in variants:
        runs = [s["methods"][variant] for s in seeds]
        row = {}
        for name in ("random", "worst"):
            row[name] = {k: mean_std([r[name]["metrics"][k] for r in runs]) for k in METRICS}
            row[name]["retrain_UA"] = mean_std([r[name]["retrain"]["UA"] for r in runs])
            for k in ("gap", "forget_ce", "seconds"):
                row[name][k] = mean_std([r[name][k] for r in runs])
        row["random"]["forget_ce_before"] = mean_std([s["original_forget_ce_random"] for s in seeds])
        row["worst"]["forget_ce_before"] = mean_std([r["original_forget_ce_worst"] for r in runs])
        verdicts = [harder(r["random"], r["worst"]) for r in runs]
        row["harder_in_seeds"] = {k: sum(v[k] for v in verdicts) for k in verdicts[0]}
        row["search_seconds"] = mean_std([r["search_seconds"] for r in runs])
        row["search_cost_vs_unlearning"] = mean_std([r["search_cost_vs_unlearning"] for r in runs])
        row["overlap_with_random"] = mean_std([r["overlap_with_random"] for r in runs])
        row["random"]["mislabeled"] = mean_std([s["mislabeled_random"] for s in seeds])
        row["worst"]["mislabeled"] = mean_std([r["mislabeled_worst"] for r in runs])
        summary[variant] = row
    return summary


def noise_sweep(regimes: list[dict], args) -> list[dict]:
    """FT and Retrain on random sets per label-noise rate: the regimes' seeds, plus `--sweep-noise` rates."""
    rows = []
    for noise in sorted(set(args.sweep_noise) | {r["label_noise"] for r in regimes}):
        regime = next((r for r in regimes if r["label_noise"] == noise and "ft" in args.variants), None)
        seeds = []
        for seed in range(args.seeds):
            if regime is not None:
                s = regime["per_seed"][seed]
                seeds.append({"mislabeled": s["mislabeled_random"], "original_TA": s["original_TA"],
                              "retrain_UA": s["retrain_random"]["UA"], "ft_UA": s["methods"]["ft"]["random"]["metrics"]["UA"]})
                continue
            data, original, random_idx, retrain = random_set_seed(seed, noise, args)
            ft = unlearn_and_score(original, data, random_idx, "ft", seed, args.epochs)
            seeds.append({"mislabeled": mislabeled(data, random_idx), "original_TA": accuracy(original, data.test_x, data.test_y),
                          "retrain_UA": retrain["metrics"]["UA"], "ft_UA": ft["metrics"]["UA"]})
            print(f"  sweep noise {noise:g} seed {seed}: Retrain UA {seeds[-1]['retrain_UA']:.2f} FT UA {seeds[-1]['ft_UA']:.2f}",
                  flush=True)
        rows.append({"label_noise": noise, "per_seed": seeds,
                     **{k: mean_std([s[k] for s in seeds]) for k in seeds[0]},
                     "ft_forgets_in_seeds": sum(s["ft_UA"] > 0 for s in seeds)})
    return rows


# ----------------------------------------------------------------------------- prompt-wise


def erase_prompt_set(pipe, problem, forget_items: list[int], args, seed: int):
    """SalUn on the digits UNet through erase/train.py's own pieces (erase.erasure): forget = the
    chosen candidates' images, each remapped to its anchor; retain = the other candidates' images;
    the saliency mask from the forget images; Adam under MaskedUpdate, `prompt_steps` steps of 8 + 8."""
    from accelerate import Accelerator

    from erase.conditioning import cat
    from erase.erasure import ErasureData, TrainConfig, masked_optimizer, saliency_mask, train_steps

    d, p = problem.data, len(problem.data.embeds)
    forget = torch.isin(d.prompt_of, torch.tensor(forget_items))
    data = ErasureData(  # prompt rows: the empty prompt, the candidates, their anchors
        forget_latents=d.latents[forget], forget_prompt=1 + d.prompt_of[forget], anchor_prompt=1 + p + d.prompt_of[forget],
        retain_latents=d.latents[~forget], retain_prompt=1 + d.prompt_of[~forget],
        prompt_embeds=cat([d.uncond_embeds, d.embeds, d.anchor_embeds]).float())
    cfg = TrainConfig(forget_prompt=["(the chosen candidates)"], train_batch_size=8, saliency_batch_size=8,
                      max_train_steps=args.prompt_steps, learning_rate=args.prompt_lr, beta=args.beta,
                      mask_ratio=args.mask_ratio, seed=seed)
    accelerator = Accelerator(cpu=True)
    unet = copy.deepcopy(pipe.unet)
    mask = saliency_mask(unet, problem.scheduler, data, cfg, accelerator)
    optimizer, update = masked_optimizer(unet, mask, cfg.learning_rate)
    train_steps(accelerator, unet, optimizer, data, problem.scheduler, cfg)
    update.remove()
    return unet.eval()


def score_prompts(pipe, unet, items: list[int], n: int, classifier) -> float:
    """% of n images per prompt that the classifier reads as the prompt's digit in its colour."""
    from erase.digits import COLOURS, DEFAULT_GUIDANCE, DEFAULT_STEPS, classify_images
    from erase.sd import generate

    pairs = [(d, c) for d in range(10) for c in range(len(COLOURS))]  # candidate order of digits_candidates
    prompts, _ = digits_candidates()
    original_unet, pipe.unet = pipe.unet, unet
    try:
        images = generate(pipe, [prompts[i] for i in items for _ in range(n)], [10_000 + s for _ in items for s in range(n)],
                          DEFAULT_STEPS, DEFAULT_GUIDANCE, batch_size=64)
    finally:
        pipe.unet = original_unet
    digit, colour = classify_images(images, classifier)
    want_d = torch.tensor([pairs[i][0] for i in items for _ in range(n)])
    want_c = torch.tensor([pairs[i][1] for i in items for _ in range(n)])
    return 100.0 * float(((digit == want_d) & (colour == want_c)).float().mean())


def erase_and_score(pipe, problem, items: list[int], classifier, args, seed: int) -> dict:
    start = time.perf_counter()
    unet = erase_prompt_set(pipe, problem, items, args, seed)
    seconds = time.perf_counter() - start
    others = [i for i in range(problem.num_items) if i not in items]
    return {
        "UA_before": 100.0 - score_prompts(pipe, pipe.unet, items, args.eval_images, classifier),
        "UA": 100.0 - score_prompts(pipe, unet, items, args.eval_images, classifier),
        "RA": score_prompts(pipe, unet, others, max(1, args.eval_images // 4), classifier),
        "seconds": seconds,
    }


def prompt_seed(seed: int, pipe, classifier, args) -> dict:
    """The random set (the search's start) and, per upper loss, the searched set, each erased and scored."""
    prompts, anchors = digits_candidates()
    out = {"seed": seed, "variants": {}}
    for loss in args.prompt_losses:
        cfg = WorstCaseConfig(target="prompt", model="digits", size=str(args.prompt_size), method="salun", seed=seed,
                              outer_steps=args.prompt_outer_steps, inner_steps=args.prompt_inner_steps, batch_size=16,
                              images_per_prompt=args.images_per_prompt, eval_draws=1, prompt_loss=loss, cache_dir=args.cache_dir)
        problem = build_prompt_problem(cfg, pipe, prompts, anchors)
        m = resolve_size(cfg.size, len(prompts))
        result = search(problem, m, cfg.search_options(show_progress=False), random_start(len(prompts), m, seed))
        if "random" not in out:
            out["random"] = {"items": result.start, "prompts": [prompts[i] for i in result.start],
                             **erase_and_score(pipe, problem, result.start, classifier, args, seed)}
        run = erase_and_score(pipe, problem, result.selected, classifier, args, seed)
        out["variants"][loss] = {"items": result.selected, "prompts": [prompts[i] for i in result.selected], **run,
                                 "search_seconds": result.seconds,
                                 "search_cost_vs_unlearning": result.seconds / out["random"]["seconds"],
                                 "upper_objective": [h["upper_objective"] for h in result.history]}
        print(f"  seed {seed} prompts ({loss}): UA random {out['random']['UA']:.1f} worst {run['UA']:.1f}, "
              f"search {result.seconds:.1f} s", flush=True)
    return out


def prompt_part(args) -> dict:
    from erase.command import quiet_libraries
    from erase.digits import MODEL_DIR, load_digits_classifier
    from erase.sd import load_pipeline

    model = Path(args.model or MODEL_DIR)
    if not (model / "model_index.json").is_file():
        return {"skipped": f"the embedded digits model is not at {model}"}
    quiet_libraries()
    pipe = load_pipeline(str(model))
    classifier = load_digits_classifier()
    seeds = [prompt_seed(s, pipe, classifier, args) for s in range(args.seeds)]
    keys = ("UA", "RA", "UA_before", "seconds")
    summary = {"random": {k: mean_std([s["random"][k] for s in seeds]) for k in keys}}
    for loss in args.prompt_losses:
        runs = [s["variants"][loss] for s in seeds]
        summary[loss] = {k: mean_std([r[k] for r in runs]) for k in keys}
        summary[loss]["search_seconds"] = mean_std([r["search_seconds"] for r in runs])
        summary[loss]["search_cost_vs_unlearning"] = mean_std([r["search_cost_vs_unlearning"] for r in runs])
        summary[loss]["lower_UA_in_seeds"] = sum(r["UA"] < s["random"]["UA"] for r, s in zip(runs, seeds))
    return {"model": str(model), "per_seed": seeds, "summary": summary}


# ----------------------------------------------------------------------------- report


def fmt(stat: dict[str, float], digits: int = 2) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def data_markdown(regime: dict, result: dict, n: int) -> list[str]:
    noise = regime["label_noise"]
    title = f"digits with {noise:.0%} of the training labels flipped" if noise else "clean digits"
    lines = [
        "",
        f"## Data-wise, {title}, {result['fraction']:.0%} forget",
        "",
        "Each method unlearns with the toolkit defaults (erase.classifier.DEFAULT_LR, "
        f"{result['epochs']} epochs) on the random set and on the worst-case set searched for it. "
        "Gap = mean |metric - Retrain on the same set| over UA, RA, TA, MIA. Forget CE = cross-entropy "
        "of the forget set after unlearning (lower = still fitted). Mislabeled = flipped samples in the set. "
        f"Harder in seeds: UA lower at equal RA (RA within ±{EQUAL_RA} points) / UA lower with RA no higher (by any amount) / "
        "larger gap / lower forget CE. "
        f"Original model's test accuracy: {fmt(regime['original_TA'])}.",
        "",
        "| method | set | mislabeled | UA | RA | TA | MIA | Retrain UA | gap | forget CE before → after "
        f"| harder in seeds (UA, RA±{EQUAL_RA} / UA, RA≤ / gap / CE) | search (s) | search / unlearning |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, row in regime["summary"].items():
        for name in ("random", "worst"):
            s = row[name]
            ce = f"{s['forget_ce_before']['mean']:.5f} → {fmt(s['forget_ce'], 4)}"
            cells = [fmt(s["mislabeled"], 1)] + [fmt(s[k]) for k in METRICS] + [fmt(s["retrain_UA"]), fmt(s["gap"]), ce]
            h = row["harder_in_seeds"]
            extra = (f"{h['lower_UA_at_equal_RA']}/{n} / {h['lower_UA_no_more_RA']}/{n} / {h['larger_gap']}/{n} / "
                     f"{h['lower_forget_ce']}/{n}",
                     fmt(row["search_seconds"], 1), fmt(row["search_cost_vs_unlearning"], 1)) if name == "worst" else ("", "", "")
            lines.append(f"| {variant} | {name} | " + " | ".join(cells) + " | " + " | ".join(extra) + " |")
    for variant, row in regime["summary"].items():
        if row["random"]["UA"]["mean"] == 0 and row["worst"]["UA"]["mean"] == 0:
            lines += ["", f"{variant}: UA is 0 on both sets in every seed (the method forgets nothing even on the random "
                      "set), so UA cannot separate them. The forget CE shows how firmly each set stays fitted."]
    if noise:
        lines += ["", "With flipped labels, RA compares different retain sets: the flipped samples that the worst-case set "
                  "leaves out stay in its retain set, and a method that forgets memorised samples (FT) loses some RA there."]
    dropped = [v for v, r in regime["summary"].items() if r["worst"]["retrain_UA"]["mean"] < r["random"]["retrain_UA"]["mean"]]
    if dropped:
        lines += ["", f"Retrain's own UA is lower on the worst-case sets ({', '.join(dropped)}): the search picks samples "
                  "that the retain set alone still classifies, so Retrain forgets them no more than the approximate "
                  "methods do, and the gap to Retrain shrinks. Harder here means what the paper measures: the method "
                  "forgets less of the set at the same RA."]
    lines += ["", "Overlap of the worst-case set with its random start: "
              + ", ".join(f"{v} {fmt(r['overlap_with_random'])}" for v, r in regime["summary"].items()) + "."]
    return lines


def sweep_markdown(sweep: list[dict], n: int) -> list[str]:
    lines = [
        "", "## What FT forgets on random sets, by label noise", "",
        "FT and Retrain with the toolkit defaults on the random 10% set of each seed; mislabeled = flipped samples in it.",
        "", "| flipped labels | mislabeled in the set | original TA | Retrain UA | FT UA | FT forgets anything in seeds |",
        "|---|---|---|---|---|---|",
    ]
    for row in sweep:
        lines.append(f"| {row['label_noise']:.0%} | {fmt(row['mislabeled'], 1)} | {fmt(row['original_TA'])} | "
                     f"{fmt(row['retrain_UA'])} | {fmt(row['ft_UA'])} | {row['ft_forgets_in_seeds']}/{n} |")
    return lines


def kept(part: dict) -> str:
    where = part["kept_from"] + (f" as of commit {part['kept_from_commit']}" if part.get("kept_from_commit") else "")
    machine_line = f", {part['machine_of_that_run']}" if part.get("machine_of_that_run") else ""
    return f"{where}; that run's wall time {part['wall_seconds_of_that_run'] / 60:.1f} min{machine_line}"


def markdown(result: dict) -> str:
    n = len(result["seeds"])
    lines = [
        f"# Worst-case vs random forget sets, {n} seeds",
        "",
        "Bi-level search of erase/worst_case/ (Fan et al., ECCV 2024): "
        f"{result['outer_steps']} upper steps, lower level 20 sign-SGD steps (lr 1e-3, batch 64) of the method, "
        "normalised upper step (w_lr 0.1), started at the random set. Mean ± std over seeds.",
    ]
    if "skipped" in result["data"]:
        lines += ["", f"## Data-wise, digits, {result['fraction']:.0%} forget", "", f"Not run: {result['data']['skipped']}."]
    else:
        for regime in result["data"]["regimes"]:
            lines += data_markdown(regime, result, n)
        lines += sweep_markdown(result["data"]["sweep"], n)
    if "kept_from" in result["data"]:
        lines += ["", f"The data-wise part above is kept from an earlier run ({kept(result['data'])})."]
    lines += ["", "## Prompt-wise, embedded digits model", ""]
    prompt = result["prompt"]
    if "skipped" in prompt:
        lines.append(f"Not run: {prompt['skipped']}.")
    else:
        if "kept_from" in prompt:
            lines += [f"Kept from an earlier run ({kept(prompt)}); this run did not repeat it.", ""]
        s = prompt["summary"]
        lines += [
            f"Model: {prompt['model']}. {result['prompt_size']} of the 40 template prompts. Search: SalUn lower level "
            f"({result['prompt_inner_steps']} Adam steps, lr 1e-4, batch 16, {result['images_per_prompt']} images per prompt), "
            f"{result['prompt_outer_steps']} upper steps, started at the random set; upper loss `denoising` = the paper's "
            "(each prompt's denoising MSE on its own images), `contrast` = that minus the same MSE under the anchor prompt. "
            f"Evaluated erasure, the same for every set: SalUn (erase.erasure's loop, as erase/train.py, mask ratio {result['mask_ratio']}, "
            f"Adam lr {result['prompt_lr']}, {result['prompt_steps']} steps, batch 8 + 8, beta {result['beta']}). "
            f"UA = % of {result['eval_images']} images per forget prompt NOT read as its digit in its colour by the held-out "
            "classifier (higher = erased); RA = % of the other prompts' images read correctly.",
            "",
            "| set | UA before | UA after | RA after | erase (s) | worst UA < random UA | search (s) | search / erasure |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in s.items():
            extra = ("", "", "") if name == "random" else (
                f"{row['lower_UA_in_seeds']}/{n}", fmt(row["search_seconds"], 1), fmt(row["search_cost_vs_unlearning"], 1))
            label = "random" if name == "random" else f"worst ({name})"
            lines.append(f"| {label} | {fmt(row['UA_before'], 1)} | {fmt(row['UA'], 1)} | {fmt(row['RA'], 1)} | "
                         f"{fmt(row['seconds'], 1)} | " + " | ".join(extra) + " |")
        lines.append("")
        for seed in prompt["per_seed"]:
            sets = "; ".join(f"{k}: {v['prompts']}" for k, v in seed["variants"].items())
            lines.append(f"- seed {seed['seed']}: random {seed['random']['prompts']}; {sets}")
    commit = result.get("code", {}).get("commit")
    at = f" at {commit}" if commit else ""
    if result.get("code", {}).get("modified"):
        at += f" (with uncommitted changes to {', '.join(result['code']['modified'])})"
    lines += ["", f"Machine: {result['machine']}; code{at}; wall time {result['wall_seconds'] / 60:.1f} min"
              + (" (the parts run here)." if any("kept_from" in result[k] for k in ("data", "prompt")) else ".")]
    return "\n".join(lines) + "\n"


PROMPT_SETTINGS = ("prompt_size", "prompt_steps", "prompt_lr", "beta", "mask_ratio", "eval_images", "prompt_outer_steps",
                   "prompt_inner_steps", "images_per_prompt")


def git(*argv: str) -> str | None:
    try:
        return subprocess.run(["git", *argv], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent.parent).stdout.rstrip("\n")  # the repository root
    except (OSError, subprocess.CalledProcessError):
        return None


def code_version() -> dict:
    """The commit this run started from, and which of the files it imports (erase/, this script, bench/common.py)
    differed from that commit when it started."""
    status = git("status", "--porcelain", "--untracked-files=no", "--", "erase", "bench/worst_case.py", "bench/common.py")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "modified": [line[3:] for line in status.splitlines()] if status else ([] if status == "" else None)}


def last_commit(path: str) -> str | None:
    """The last commit that changed `path`, or None outside a git checkout."""
    return git("log", "-1", "--format=%h", "--", str(Path(path).resolve())) or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=10, help="unlearning epochs of the evaluated methods")
    parser.add_argument("--outer-steps", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=["ft", "rl", "salun", "rl:unrolled"], help="METHOD[:HYPERGRADIENT]")
    parser.add_argument("--label-noise", type=float, nargs="+", default=[0.0, 0.1, 0.2], help="data-wise regimes: flipped label fractions")
    parser.add_argument("--sweep-noise", type=float, nargs="*", default=[0.05], help="extra rates for the FT table")
    parser.add_argument("--prompt-size", type=int, default=4)
    parser.add_argument("--prompt-outer-steps", type=int, default=15)
    parser.add_argument("--prompt-inner-steps", type=int, default=10)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--prompt-losses", nargs="+", default=["denoising", "contrast"])
    parser.add_argument("--prompt-steps", type=int, default=50, help="SalUn steps of the evaluated erasure")
    parser.add_argument("--prompt-lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    parser.add_argument("--eval-images", type=int, default=8, help="images per forget prompt when scoring")
    parser.add_argument("--model", default=None, help="digits pipeline folder (default: erase/assets/digits-sd)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "erase"))
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--skip-prompt", action="store_true")
    parser.add_argument("--keep-data-from", default=None,
                        help="with --skip-data: take the data-wise part from this earlier results JSON")
    parser.add_argument("--keep-prompt-from", default=None,
                        help="with --skip-prompt: take the prompt-wise part (and its settings) from this earlier results JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/worst_case.json")
    parser.add_argument("--render", action="store_true",
                        help="recompute the summaries and the Markdown of the JSON at --out from its per-seed numbers")
    args = parser.parse_args()
    if args.render:
        result = json.loads(Path(args.out).read_text())
        for regime in result["data"].get("regimes", []):
            regime["summary"] = summarise_data(regime["per_seed"], list(regime["per_seed"][0]["methods"]))
        save_results(result, args.out, markdown(result))
        print(markdown(result))
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    code = code_version()
    data = {"skipped": "--skip-data"}
    if args.skip_data and args.keep_data_from:
        earlier = json.loads(Path(args.keep_data_from).read_text())
        data = earlier["data"] if "kept_from" in earlier["data"] else earlier["data"] | {  # kept twice: the first source
            "kept_from": args.keep_data_from, "kept_from_commit": last_commit(args.keep_data_from),
            "wall_seconds_of_that_run": earlier["wall_seconds"]}
    kept_prompt = None
    if args.skip_prompt and args.keep_prompt_from:  # read now: --out may be the same file
        kept_prompt = json.loads(Path(args.keep_prompt_from).read_text())
    if not args.skip_data:
        regimes = []
        for noise in args.label_noise:
            seeds = [data_seed(s, noise, args) for s in range(args.seeds)]
            regimes.append({"label_noise": noise, "per_seed": seeds, "summary": summarise_data(seeds, args.variants),
                            "original_TA": mean_std([s["original_TA"] for s in seeds])})
        data = {"regimes": regimes, "sweep": noise_sweep(regimes, args)}
    if kept_prompt is not None:
        prompt = kept_prompt["prompt"] if "kept_from" in kept_prompt["prompt"] else kept_prompt["prompt"] | {
            "kept_from": args.keep_prompt_from, "kept_from_commit": last_commit(args.keep_prompt_from),
            "wall_seconds_of_that_run": kept_prompt["wall_seconds"], "machine_of_that_run": kept_prompt["machine"]}
        for key in PROMPT_SETTINGS:  # the kept part's own settings, not this command's defaults
            setattr(args, key, kept_prompt[key])
    else:
        prompt = {"skipped": "--skip-prompt"} if args.skip_prompt else prompt_part(args)
    result = {
        "seeds": list(range(args.seeds)), "fraction": args.fraction, "epochs": args.epochs, "outer_steps": args.outer_steps,
        "prompt_size": args.prompt_size, "prompt_steps": args.prompt_steps, "prompt_lr": args.prompt_lr, "beta": args.beta,
        "mask_ratio": args.mask_ratio, "eval_images": args.eval_images, "prompt_outer_steps": args.prompt_outer_steps,
        "prompt_inner_steps": args.prompt_inner_steps, "images_per_prompt": args.images_per_prompt,
        "data": data, "prompt": prompt, "wall_seconds": time.perf_counter() - start,
        "machine": machine(args.threads), "code": code,
    }
    save_results(result, args.out, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
