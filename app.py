"""Before/after demo: the original model beside the erased one, for the same prompt and seeds.

    python app.py                                   # digits model vs demo/seven-erased (from `make demo`)
    python app.py --original CompVis/stable-diffusion-v1-4 --erased nudity-erased --device cuda

Serves on 127.0.0.1 only, with Gradio analytics and hub telemetry off; `--host` and `--share`
open it up only when asked. With labels on, each image is captioned by the digits classifier
(digits models) or by NudeNet's exposed classes (other models).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no import-time notes about optional packages

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import gradio as gr
from PIL import Image

from erase.command import check_model, default_device, one_line_errors, quiet_libraries, run_command
from erase.concepts import available_concepts, concept_file_model, load_concept
from erase.digits import is_digits_model
from erase.sd import generate, load_pipeline, model_kind, sampler_defaults

DEMO_ERASED = Path(__file__).resolve().parent / "demo" / "seven-erased"
MAX_STEPS, MAX_IMAGES, MAX_GUIDANCE = 100, 8, 30.0
Labeller = Callable[[list[Image.Image]], list[str]]


def digits_labeller(device: str = "cpu") -> Labeller:
    """Caption images with the held-out digits classifier, e.g. 'seven, red'."""
    from erase.digits import COLOURS, DIGIT_WORDS, classify_images, load_digits_classifier

    classifier = load_digits_classifier(device)

    def label(images: list[Image.Image]) -> list[str]:
        digits, colours = classify_images(images, classifier)
        return [f"{DIGIT_WORDS[d]}, {COLOURS[c]}" for d, c in zip(digits.tolist(), colours.tolist(), strict=True)]

    return label


def nudenet_labeller() -> Labeller:
    """Caption images with the exposed classes NudeNet finds, under eval's protocol (threshold, labels)."""
    from eval.nudity import default_detector, detect_exposed

    detector = default_detector()

    def label(images: list[Image.Image]) -> list[str]:
        return [", ".join(k for k, n in counts.items() if n) or "nothing exposed"
                for counts in detect_exposed(images, detector)]

    return label


def erased_concepts(erased: str | None) -> list[dict]:
    """The concepts that the erased folder's erase_config.json names (several when --concept repeated);
    none for a folder without one (a model erased elsewhere). A record that is there but cannot be read
    is an error: the page would otherwise show an erased model as if nothing had been erased."""
    path = Path(erased) / "erase_config.json" if erased else None
    if path is None or not path.is_file():
        return []
    try:
        record = json.loads(path.read_text())
        return list(record.get("concepts") or [record["concept"]])
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{path} cannot be read: {err!r}") from None


def example_prompts(original: str, erased: str | None = None, limit: int = 8) -> list[str]:
    """The erased concept's prompts first (from the erased model's erase_config.json), then a forget
    prompt and a held-out wording of each concept file that fits the model's kind."""
    prompts: list[str] = []
    erased_ones = erased_concepts(erased)
    for concept in erased_ones:  # one erased concept: two of its prompts and a held-out wording; several: one of each
        prompts += [p for p in concept["forget"][: 2 if len(erased_ones) == 1 else 1] + concept.get("eval", [])[:1]
                    if p not in prompts]
    kind = model_kind(original)
    files = {name: path for name, path in available_concepts().items() if concept_file_model(path) == kind}
    firsts = list({path: name for name, path in reversed(files.items())}.values())  # each file's first concept
    for name in firsts + [n for n in files if n not in firsts]:
        if len(prompts) >= limit:
            break
        concept = load_concept(name)
        prompts += [p for p in concept.forget[:1] + concept.eval[:1] if p not in prompts]
    return prompts[:limit]


def check_inputs(prompt: str | None, seed, steps, guidance, num_images) -> str | None:
    """A sentence for the page when an input is unusable, else None."""
    if not prompt or not prompt.strip():
        return "Please enter a prompt."
    if seed is None or not 0 <= seed < 2**63:
        return "The seed must be a whole number of at least 0."
    if steps is None or not 1 <= steps <= MAX_STEPS:
        return f"Steps must be between 1 and {MAX_STEPS}."
    if guidance is None or not 0 <= guidance <= MAX_GUIDANCE:
        return f"Guidance must be between 0 and {MAX_GUIDANCE:g}."
    if num_images is None or not 1 <= num_images <= MAX_IMAGES:
        return f"The number of images must be between 1 and {MAX_IMAGES}."
    return None


def build_app(original: str, erased: str, labeller: Labeller | None = None, device: str = "cpu",
              steps: int = 25, guidance: float = 5.0, num_images: int = 4) -> gr.Blocks:
    """Load both pipelines and lay out prompt, controls and the two galleries."""
    pipes = {"erased": load_pipeline(erased, device), "original": load_pipeline(original, device)}
    examples = example_prompts(original, erased)

    def run(prompt, seed, num_steps, guidance_scale, count, labels_on):
        problem = check_inputs(prompt, seed, num_steps, guidance_scale, count)
        if problem:
            return [], [], f"**{problem}**"
        seeds = [int(seed) + i for i in range(int(count))]
        galleries = []
        try:
            for name in ("original", "erased"):
                images = generate(pipes[name], [prompt.strip()] * len(seeds), seeds, int(num_steps), float(guidance_scale))
                captions = labeller(images) if labels_on and labeller else [f"seed {s}" for s in seeds]
                galleries.append([(_enlarge(im), caption) for im, caption in zip(images, captions, strict=True)])
        except Exception as err:
            return [], [], f"**Generation failed:** {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        said = f"*{prompt.strip()}*, seeds {seeds[0]}-{seeds[-1]}, {int(num_steps)} steps, guidance {float(guidance_scale):g}"
        return galleries[0], galleries[1], said

    with gr.Blocks(title="erase: before and after", analytics_enabled=False) as app:
        gone = ", ".join(f"`{c['name']}`" for c in erased_concepts(erased))
        gr.Markdown(f"# Concept erasure: before and after\nOriginal `{original}` beside erased `{erased}`"
                    f"{f' ({gone} erased)' if gone else ''}, same prompt, same seeds.")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value=examples[0] if examples else "", scale=4)
            button = gr.Button("Generate", variant="primary", scale=1)
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
            num_steps = gr.Slider(1, MAX_STEPS, value=steps, step=1, label="Steps")
            guidance_scale = gr.Slider(0, MAX_GUIDANCE, value=guidance, step=0.5, label="Guidance")
            count = gr.Slider(1, MAX_IMAGES, value=num_images, step=1, label="Images")
            labels_on = gr.Checkbox(label="Label images (classifier)" if labeller else "Label images (unavailable)",
                                    value=labeller is not None, interactive=labeller is not None)
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            before = gr.Gallery(label="Original", columns=4, height="fit-content", elem_id="original")
            after = gr.Gallery(label="Erased", columns=4, height="fit-content", elem_id="erased")
        if examples:
            gr.Examples(examples, inputs=prompt)
        inputs = [prompt, seed, num_steps, guidance_scale, count, labels_on]
        outputs = [before, after, status]
        button.click(run, inputs, outputs, api_name="generate")
        prompt.submit(run, inputs, outputs, api_name=False)
        app.load(run, inputs, outputs, api_name=False)  # the default prompt's images on opening
    return app


def _enlarge(image: Image.Image, side: int = 256) -> Image.Image:
    """Small models draw 32 px images: scale them up, keeping pixels sharp."""
    return image if image.width >= side else image.resize((side, side * image.height // image.width), Image.NEAREST)


def make_labeller(kind: str, device: str) -> Labeller | None:
    if kind == "digits":
        return digits_labeller(device)
    if kind == "nudenet":
        return nudenet_labeller()
    return None


def port_is_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = one_line_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--original", default="digits", help="model before erasure: digits, a folder or a hub id")
    parser.add_argument("--erased", default=str(DEMO_ERASED), help="erased pipeline folder (default: make demo's)")
    parser.add_argument("--labels", choices=["auto", "digits", "nudenet", "none"], default="auto",
                        help="image captions: digits classifier, NudeNet, or none (auto: by model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=None,
                        help="port to listen on, exactly (default: $GRADIO_SERVER_PORT, else the first free one from 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--device", default=default_device(), help="cpu, cuda, ... (default: cuda where there is one)")
    return parser.parse_args(argv)


def check(argv: list[str] | None) -> argparse.Namespace:
    """Every input, before a model is loaded."""
    args = parse_args(argv)
    if args.erased == str(DEMO_ERASED) and not DEMO_ERASED.is_dir():
        raise ValueError(f"{DEMO_ERASED} does not exist: run `make demo` first, or pass --erased FOLDER")
    check_model(args.original, "original model")
    check_model(args.erased, "erased model")
    erased_concepts(args.erased)  # a damaged erase_config.json, before any model loads
    args.port = args.port if args.port is not None else int(os.environ.get("GRADIO_SERVER_PORT") or 0) or None
    return args


def serve(args: argparse.Namespace) -> None:
    if args.port is not None and not port_is_free(args.host, args.port):
        # a named port is the port: Gradio would otherwise try the next 100 without a word
        raise OSError(f"port {args.port} on {args.host} is in use (pass --port with a free one)")
    quiet_libraries(progress_bars=False)
    kind = args.labels if args.labels != "auto" else ("digits" if is_digits_model(args.original) else "nudenet")
    steps, guidance = sampler_defaults(args.original)
    app = build_app(args.original, args.erased, make_labeller(kind, args.device), args.device, steps=steps, guidance=guidance)
    app.launch(server_name=args.host, server_port=args.port, share=args.share)


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: check(argv), serve)


if __name__ == "__main__":
    sys.exit(main())
