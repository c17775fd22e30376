"""Quality of the embedded digits model, judged by the held-out digits classifier.

For every (digit, colour) prompt of the template ("a red handwritten digit seven") this
generates `--n-per-prompt` images with the default sampler (DDIM, `DEFAULT_STEPS` steps,
guidance `DEFAULT_GUIDANCE`, 32x32) and reports digit and colour accuracy overall, per
digit and per colour. Extras: the trained paraphrases ("the number 7 in red", "digit 7"),
wordings never used in training ("a seven in red"), the classifier on real held-out digits
(its ceiling), and the time to generate 16 images on this machine.

    python bench/digits_quality.py --n-per-prompt 50 --out bench/results/digits_quality.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from erase.command import versions
from erase.digits import (
    COLOURS,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    DIGIT_PARAPHRASES,
    DIGIT_WORDS,
    FULL_PARAPHRASES,
    PROMPT_TEMPLATE,
    RESOLUTION,
    classify_images,
    coloured_split,
    load_digits_classifier,
    resolve_model,
)
from erase.sd import generate, load_pipeline, max_sequence_length
from eval.classes import class_samples, digits_task, evaluate_classes, summarise
from eval.generate import Generated, Sample, generate_samples

from common import save_results

# Wordings the model never saw in training (all words are in its vocabulary).
UNSEEN_WORDINGS = ("a {word} in {colour}", "{colour} {word}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits", help='"digits", "digits-flow" or a pipeline folder')
    parser.add_argument("--n-per-prompt", type=int, default=50, help="images per template prompt")
    parser.add_argument("--n-paraphrase", type=int, default=10, help="images per paraphrase prompt (0 skips)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-plain", type=int, default=4,
                        help="flow models: images per template prompt from the plain pipeline's defaults (0 skips)")
    parser.add_argument("--out", default="bench/results/digits_quality.json")
    return parser.parse_args(argv)


def template_report(pipe, task, n: int, steps: int, guidance: float, seed: int) -> dict:
    """Every (digit, colour) template prompt, n images each (eval.classes' seeds and tally), plus the
    colour accuracy within each digit (the same tally with the heads swapped)."""
    samples = class_samples(task, n, guidance, seed)
    report = evaluate_classes(pipe, task, samples, steps)
    by_sample = {p["index"]: p for p in report["predictions"]}
    scored = [Generated(s, {"digit": by_sample[s.index]["digit"], "colour": by_sample[s.index]["colour"]}) for s in samples]
    swapped = replace(task, heads={"colour": task.heads["colour"], "digit": task.heads["digit"]})
    report["colour_accuracy_by_digit"] = summarise(swapped, scored)["accuracy_by_digit"]
    return report


def time_16_images(pipe, steps: int, guidance: float) -> float:
    prompt = PROMPT_TEMPLATE.format(colour="red", word="seven")
    generate(pipe, [prompt] * 2, [0, 1], steps, guidance)  # warm-up
    start = time.perf_counter()
    generate(pipe, [prompt] * 16, list(range(16)), steps, guidance)
    return round(time.perf_counter() - start, 3)


def paraphrase_hits(pipe, task, template: str, n: int, steps: int, guidance: float, seed: int) -> dict:
    """Digit (and, where the template names one, colour) accuracy of n images per digit."""
    colours = range(len(COLOURS)) if "{colour}" in template else [None]
    prompts = [(d, c) for d in range(10) for c in colours]
    samples = [Sample(i * n + k, template.format(colour=COLOURS[c] if c is not None else "", word=DIGIT_WORDS[d], numeral=d),
                      seed + i * n + k, guidance, {"digit": d, "colour": c})
               for i, (d, c) in enumerate(prompts) for k in range(n)]

    def score(images):
        preds = task.predict(images)
        return [{h: int(p[j]) for h, p in preds.items()} for j in range(len(images))]

    done = generate_samples(pipe, samples, steps, score=score, desc=template)
    entry = {"digit_accuracy": round(sum(g.result["digit"] == g.sample.labels["digit"] for g in done) / len(done), 4),
             "images": len(done)}
    if colours != [None]:
        entry["colour_accuracy"] = round(sum(g.result["colour"] == g.sample.labels["colour"] for g in done) / len(done), 4)
    return entry


def plain_pipeline_default(path: str, classifier, n: int, steps: int, guidance: float, seed: int) -> dict:
    """A flow model called as a user would (its plain pipeline class, every default, T5's window
    included: 256 zero rows for a StableDiffusion3Pipeline without T5) on the template prompts."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    hits_digit = hits_colour = total = 0
    for d in range(10):
        for c, colour in enumerate(COLOURS):
            images = pipe(PROMPT_TEMPLATE.format(colour=colour, word=DIGIT_WORDS[d]), num_images_per_prompt=n, num_inference_steps=steps,
                          guidance_scale=guidance, generator=torch.Generator().manual_seed(seed + 100 * d + c), output_type="pt").images
            digit_pred, colour_pred = classify_images(images, classifier)
            hits_digit += int((digit_pred == d).sum())
            hits_colour += int((colour_pred == c).sum())
            total += len(images)
    return {"digit_accuracy": round(hits_digit / total, 4), "colour_accuracy": round(hits_colour / total, 4), "images": total,
            "max_sequence_length": 256}


def real_digit_ceiling(classifier) -> dict[str, float]:
    """The classifier on the held-out real digits, in every colour."""
    rgb, digits, colours = coloured_split("test")
    digit_pred, colour_pred = classify_images(rgb, classifier)
    return {"digit": round(float((digit_pred == digits).float().mean()), 4),
            "colour": round(float((colour_pred == colours).float().mean()), 4), "images": len(digits)}


def paraphrase_report(pipe, task, n: int, steps: int, guidance: float, seed: int) -> dict:
    """Accuracy per paraphrase template: trained full, trained digit-only, and unseen wordings."""
    report: dict = {}
    groups = (("trained_full", FULL_PARAPHRASES), ("trained_digit_only", DIGIT_PARAPHRASES), ("unseen", UNSEEN_WORDINGS))
    for g, (group, templates) in enumerate(groups):
        report[group] = {t: paraphrase_hits(pipe, task, t, n, steps, guidance, seed + 10**6 * (1 + 10 * g + i))
                         for i, t in enumerate(templates)}
    return report


def markdown(result: dict) -> str:
    sampler = {"DDIMScheduler": "DDIM", "FlowMatchEulerDiscreteScheduler": "flow-matching Euler"}.get(result["settings"].get("sampler"), "DDIM")
    lines = [f"# Digits model quality ({result['settings']['model']})", "",
             f"{sampler} {result['settings']['steps']} steps, guidance {result['settings']['guidance']}, "
             f"{RESOLUTION}x{RESOLUTION}, {result['settings']['n_per_prompt']} images per prompt, "
             f"judged by the held-out classifier.", "",
             "| | digit accuracy | colour accuracy |", "|---|---|---|",
             f"| **overall** | **{result['digit_accuracy']:.3f}** | **{result['colour_accuracy']:.3f}** |"]
    for digit in range(10):
        lines.append(f"| digit {digit} ({DIGIT_WORDS[digit]}) | {result['per_digit'][str(digit)]['digit_accuracy']:.3f}"
                     f" | {result['per_digit'][str(digit)]['colour_accuracy']:.3f} |")
    for colour in COLOURS:
        lines.append(f"| colour {colour} | {result['per_colour'][colour]['digit_accuracy']:.3f}"
                     f" | {result['per_colour'][colour]['colour_accuracy']:.3f} |")
    if result.get("paraphrases"):
        lines += ["", "| paraphrase | kind | digit accuracy | colour accuracy |", "|---|---|---|---|"]
        for group, entries in result["paraphrases"].items():
            for template, e in entries.items():
                colour = f"{e['colour_accuracy']:.3f}" if "colour_accuracy" in e else "-"
                lines.append(f"| `{template}` | {group} | {e['digit_accuracy']:.3f} | {colour} |")
    if result.get("plain_pipeline_default"):
        plain = result["plain_pipeline_default"]
        lines += ["", f"Called as a plain StableDiffusion3Pipeline with every default (T5's window "
                      f"{plain['max_sequence_length']} zero rows, against the toolkit's {result['settings'].get('text_window')}): "
                      f"digit {plain['digit_accuracy']:.3f}, colour {plain['colour_accuracy']:.3f} ({plain['images']} images)."]
    ceiling = result["classifier_on_real_test_digits"]
    lines += ["", f"Classifier on real held-out digits: digit {ceiling['digit']:.3f}, colour {ceiling['colour']:.3f}.",
              f"16 images on this CPU: {result['seconds_for_16_images']:.2f} s. "
              f"Whole benchmark: {result['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    pipe = load_pipeline(args.model)
    classifier = load_digits_classifier()
    task = digits_task(classifier)
    seconds_16 = time_16_images(pipe, args.steps, args.guidance)
    t = template_report(pipe, task, args.n_per_prompt, args.steps, args.guidance, args.seed)
    result = {
        "digit_accuracy": t["overall_accuracy"], "colour_accuracy": t["overall_colour_accuracy"], "images": t["num_images"],
        "per_digit": {str(d): {"digit_accuracy": t["accuracy"][w], "colour_accuracy": t["colour_accuracy_by_digit"][w]}
                      for d, w in enumerate(DIGIT_WORDS)},
        "per_colour": {c: {"digit_accuracy": t["accuracy_by_colour"][c], "colour_accuracy": t["colour_accuracy"][c]}
                       for c in COLOURS},
        "paraphrases": paraphrase_report(pipe, task, args.n_paraphrase, args.steps, args.guidance, args.seed)
        if args.n_paraphrase else {},
        "classifier_on_real_test_digits": real_digit_ceiling(classifier),
        "seconds_for_16_images": seconds_16,
        "plain_pipeline_default": plain_pipeline_default(resolve_model(args.model), classifier, args.n_plain, args.steps, args.guidance,
                                                         args.seed) if args.n_plain and type(pipe).__name__ == "StableDiffusion3Pipeline" else None,
        "settings": {"model": args.model, "model_path": resolve_model(args.model), "sampler": type(pipe.scheduler).__name__,
                     "steps": args.steps, "guidance": args.guidance, "resolution": RESOLUTION,
                     "n_per_prompt": args.n_per_prompt, "n_paraphrase": args.n_paraphrase, "seed": args.seed,
                     "seed_rule": "eval.classes.class_samples: seed + prompt_index * n + k",
                     "prompt_template": PROMPT_TEMPLATE, "torch_threads": torch.get_num_threads(),
                     "text_window": max_sequence_length(pipe)},
        "versions": versions(),
    }
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    save_results(result, args.out, markdown(result))
    print(f"digit accuracy {result['digit_accuracy']:.3f}, colour accuracy {result['colour_accuracy']:.3f} "
          f"({result['images']} images, {result['wall_seconds']:.0f} s) -> {args.out}")


if __name__ == "__main__":
    main()
