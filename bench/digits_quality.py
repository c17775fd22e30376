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
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from erase.cli import versions  # noqa: E402
from erase.digits import (  # noqa: E402
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

# Wordings the model never saw in training (all words are in its vocabulary).
UNSEEN_WORDINGS = ("a {word} in {colour}", "{colour} {word}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits", help='"digits" or a pipeline folder')
    parser.add_argument("--n-per-prompt", type=int, default=50, help="images per template prompt")
    parser.add_argument("--n-paraphrase", type=int, default=10, help="images per paraphrase prompt (0 skips)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/digits_quality.json")
    return parser.parse_args(argv)


class Sampler:
    """The pipeline with fixed settings; every call gets its own seeded generator."""

    def __init__(self, model: str, steps: int, guidance: float, seed: int) -> None:
        from diffusers import StableDiffusionPipeline

        self.pipe = StableDiffusionPipeline.from_pretrained(resolve_model(model))
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance, self.seed, self.calls = steps, guidance, seed, 0

    def __call__(self, prompt: str, n: int) -> torch.Tensor:
        """(n, 3, 32, 32) images in [0, 1]."""
        self.calls += 1
        generator = torch.Generator().manual_seed(self.seed * 100_000 + self.calls)
        out = self.pipe(prompt, num_images_per_prompt=n, num_inference_steps=self.steps,
                        guidance_scale=self.guidance, generator=generator, output_type="pt")
        return out.images


class Tally:
    """Correct / total counts under named keys."""

    def __init__(self) -> None:
        self.right: dict[str, int] = defaultdict(int)
        self.total: dict[str, int] = defaultdict(int)

    def add(self, key: str, correct: torch.Tensor) -> None:
        self.right[key] += int(correct.sum())
        self.total[key] += len(correct)

    def fractions(self) -> dict[str, float]:
        return {k: round(self.right[k] / self.total[k], 4) for k in self.total}


def time_16_images(sampler: Sampler) -> float:
    sampler(PROMPT_TEMPLATE.format(colour="red", word="seven"), 2)  # warm-up
    start = time.perf_counter()
    sampler(PROMPT_TEMPLATE.format(colour="red", word="seven"), 16)
    return round(time.perf_counter() - start, 3)


def judge(sampler, classifier, template: str, n: int, check_colour: bool = True) -> tuple[Tally, Tally]:
    """Generate n images per (digit, colour) filling `template`; tally digit and colour hits."""
    digit_tally, colour_tally = Tally(), Tally()
    colours = COLOURS if check_colour or "{colour}" in template else COLOURS[:1]
    pairs = [(d, c) for d in range(10) for c in range(len(colours))]
    for digit, c in tqdm(pairs, desc=template, leave=False):
        colour, word = colours[c], DIGIT_WORDS[digit]
        prompt = template.format(colour=colour, word=word, numeral=digit)
        digit_pred, colour_pred = classify_images(sampler(prompt, n), classifier)
        for key in ("all", f"digit {digit}", f"colour {colour}"):
            digit_tally.add(key, digit_pred == digit)
            if "{colour}" in template:
                colour_tally.add(key, colour_pred == c)
    return digit_tally, colour_tally


def real_digit_ceiling(classifier) -> dict[str, float]:
    """The classifier on the held-out real digits, in every colour."""
    rgb, digits, colours = coloured_split("test")
    digit_pred, colour_pred = classify_images(rgb, classifier)
    return {"digit": round(float((digit_pred == digits).float().mean()), 4),
            "colour": round(float((colour_pred == colours).float().mean()), 4), "images": len(digits)}


def paraphrase_report(sampler, classifier, n: int) -> dict:
    """Accuracy per paraphrase template: trained full, trained digit-only, and unseen wordings."""
    report: dict = {}
    for group, templates in (("trained_full", FULL_PARAPHRASES), ("trained_digit_only", DIGIT_PARAPHRASES),
                             ("unseen", UNSEEN_WORDINGS)):
        report[group] = {}
        for template in templates:
            digit_tally, colour_tally = judge(sampler, classifier, template, n, check_colour=False)
            entry = {"digit_accuracy": digit_tally.fractions()["all"], "images": digit_tally.total["all"]}
            if colour_tally.total:
                entry["colour_accuracy"] = colour_tally.fractions()["all"]
            report[group][template] = entry
    return report


def markdown(result: dict) -> str:
    lines = [f"# Digits model quality ({result['settings']['model']})", "",
             f"DDIM {result['settings']['steps']} steps, guidance {result['settings']['guidance']}, "
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
    ceiling = result["classifier_on_real_test_digits"]
    lines += ["", f"Classifier on real held-out digits: digit {ceiling['digit']:.3f}, colour {ceiling['colour']:.3f}.",
              f"16 images on this CPU: {result['seconds_for_16_images']:.2f} s. "
              f"Whole benchmark: {result['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    sampler = Sampler(args.model, args.steps, args.guidance, args.seed)
    classifier = load_digits_classifier()
    seconds_16 = time_16_images(sampler)
    digit_tally, colour_tally = judge(sampler, classifier, PROMPT_TEMPLATE, args.n_per_prompt)
    digits, colours = digit_tally.fractions(), colour_tally.fractions()
    result = {
        "digit_accuracy": digits["all"], "colour_accuracy": colours["all"], "images": digit_tally.total["all"],
        "per_digit": {str(d): {"digit_accuracy": digits[f"digit {d}"], "colour_accuracy": colours[f"digit {d}"]}
                      for d in range(10)},
        "per_colour": {c: {"digit_accuracy": digits[f"colour {c}"], "colour_accuracy": colours[f"colour {c}"]}
                       for c in COLOURS},
        "paraphrases": paraphrase_report(sampler, classifier, args.n_paraphrase) if args.n_paraphrase else {},
        "classifier_on_real_test_digits": real_digit_ceiling(classifier),
        "seconds_for_16_images": seconds_16,
        "settings": {"model": args.model, "model_path": resolve_model(args.model), "sampler": "DDIMScheduler",
                     "steps": args.steps, "guidance": args.guidance, "resolution": RESOLUTION,
                     "n_per_prompt": args.n_per_prompt, "n_paraphrase": args.n_paraphrase, "seed": args.seed,
                     "prompt_template": PROMPT_TEMPLATE, "torch_threads": torch.get_num_threads()},
        "versions": versions(),
    }
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(f"digit accuracy {result['digit_accuracy']:.3f}, colour accuracy {result['colour_accuracy']:.3f} "
          f"({result['images']} images, {result['wall_seconds']:.0f} s) -> {out}")


if __name__ == "__main__":
    main()
