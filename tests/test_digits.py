"""The embedded digits model: committed weights, tokenizer, training, classifier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erase import digits
from erase.digits import (
    COLOURS,
    ClassifierTrainingOptions,
    DigitsTrainingOptions,
    build_tokenizer,
    classify_images,
    coloured_split,
    load_digits_classifier,
    prompt_for,
    resolve_model,
    train_classifier,
    train_pipeline,
)
from erase.digits import flow as flow_build
from erase.digits.flow import FlowTrainingOptions, train_flow_pipeline

# Run in a fresh interpreter outside the repository: it must never import this project.
_LOAD_AND_GENERATE = textwrap.dedent(
    """
    import sys, torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
    assert isinstance(pipe.scheduler, DDIMScheduler), type(pipe.scheduler)
    assert pipe.safety_checker is None
    out = pipe("a red handwritten digit seven", num_inference_steps=2, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 32, 32, 3), out.shape
    assert (out >= 0).all() and (out <= 1).all()
    assert not any(name == "erase" or name.startswith("erase.") for name in sys.modules)
    print("OK")
    """
)


# digits-flow with its plain pipeline class, called as a user would (T5's default window included).
_LOAD_AND_GENERATE_FLOW = textwrap.dedent(
    """
    import sys, torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(sys.argv[1], text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler), type(pipe.scheduler)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    for window in (16, 256):
        out = pipe("a red handwritten digit seven", num_inference_steps=2, guidance_scale=5.0, max_sequence_length=window,
                   generator=torch.Generator().manual_seed(0), output_type="np").images
        assert out.shape == (1, 32, 32, 3), out.shape
        assert (out >= 0).all() and (out <= 1).all()
    assert not any(name == "erase" or name.startswith("erase.") for name in sys.modules)
    print("OK")
    """
)


def _load_in_fresh_process(folder: Path, cwd: Path, script: str = _LOAD_AND_GENERATE) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_committed_pipeline_loads_with_plain_diffusers(tmp_path):
    _load_in_fresh_process(digits.MODEL_DIR, tmp_path)


def test_committed_flow_pipeline_loads_with_plain_diffusers(tmp_path):
    _load_in_fresh_process(digits.FLOW_MODEL_DIR, tmp_path, _LOAD_AND_GENERATE_FLOW)


def test_committed_assets_fit_in_40_mb():
    """Both embedded models and the classifier (digits-sd about 16 MB, digits-flow about 16 MB)."""
    files = [p for d in (digits.MODEL_DIR, digits.FLOW_MODEL_DIR) for p in d.rglob("*") if p.is_file()] + [digits.CLASSIFIER_PATH]
    assert sum(p.stat().st_size for p in files) <= 40 * 1024 * 1024
    for folder in (digits.MODEL_DIR, digits.FLOW_MODEL_DIR):
        assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))


def test_flow_model_reads_the_same_words_through_its_two_clips():
    from transformers import CLIPTokenizer

    config = json.loads((digits.FLOW_MODEL_DIR / "vae" / "config.json").read_text())
    assert config["shift_factor"] == 0.0  # StableDiffusion3Pipeline reads one
    for sub in ("tokenizer", "tokenizer_2"):
        saved = CLIPTokenizer.from_pretrained(digits.FLOW_MODEL_DIR / sub)
        assert saved.get_vocab() == build_tokenizer().get_vocab() and saved.model_max_length == flow_build.TEXT_WINDOW


def test_smoke_training_is_deterministic_and_loadable(tmp_path):
    def train(name: str) -> Path:
        opts = DigitsTrainingOptions(output_dir=str(tmp_path / name), vae_steps=2, max_train_steps=2,
                                     train_batch_size=8, limit_images=32)
        return train_pipeline(opts)

    first, second = train("a"), train("b")

    a = load_file(first / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(second / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((first / "digits_training.json").read_text())["options"]["max_train_steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no partial folders left
    _load_in_fresh_process(first, tmp_path)


def test_flow_smoke_training_is_deterministic_and_loadable(tmp_path):
    def train(name: str) -> Path:
        opts = FlowTrainingOptions(output_dir=str(tmp_path / name), vae_steps=2, max_train_steps=2, train_batch_size=8,
                                   limit_images=32)
        return train_flow_pipeline(opts)

    first, second = train("a"), train("b")
    # digits-sd's build draws the same VAE steps from the seed: the same autoencoder
    sd = train_pipeline(DigitsTrainingOptions(output_dir=str(tmp_path / "sd"), vae_steps=2, max_train_steps=1, train_batch_size=8,
                                              limit_images=32))
    vae_sd, vae_flow = (load_file(str(f / "vae" / "diffusion_pytorch_model.safetensors")) for f in (sd, first))
    assert all(torch.equal(vae_sd[k], vae_flow[k]) for k in vae_sd)
    a = load_file(first / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(second / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((first / "digits_training.json").read_text())
    assert record["options"]["max_train_steps"] == 2 and record["options"]["learning_rate"] == FlowTrainingOptions.learning_rate
    assert json.loads((first / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "sd"]  # the plain-pipeline load: the committed model's test


@pytest.mark.parametrize("rows", [16, 256])
def test_one_zero_row_with_log_n_added_is_n_zero_rows(rows):
    """What digits-flow trains on (one T5 zero row whose attention logit is raised by log n) gives what the
    plain pipeline's n zero rows give, through every block of a transformer with random weights."""
    import math

    from diffusers import StableDiffusion3Pipeline
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from erase.conditioning import Conditioning
    from erase.families import predict

    parts = flow_build.build_flow_components(0)
    transformer = parts["transformer"].eval()
    with torch.no_grad():  # off the zero init of the output layers, so every block's output counts
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    pipe = StableDiffusion3Pipeline(**parts)
    prompts = ["a red handwritten digit seven", "digit 3", ""]
    x, t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([100.0, 500.0, 900.0])

    def encode(window):
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=window)
        return Conditioning(hidden, pooled)

    with torch.no_grad():
        reference = predict(transformer, x, t, encode(rows))
        attention = flow_build.CountedZerosAttention()
        attention.log_count = torch.full((3,), math.log(rows))
        transformer.set_attn_processor(attention)
        ours = predict(transformer, x, t, encode(1))
        transformer.set_attn_processor(JointAttnProcessor2_0())
        single = predict(transformer, x, t, encode(1))
    assert torch.allclose(ours, reference, atol=1e-5)
    assert not torch.allclose(single, reference, atol=1e-3)  # the log n matters


def test_options_are_validated():
    with pytest.raises(ValueError):
        DigitsTrainingOptions(max_train_steps=0)
    with pytest.raises(ValueError):
        DigitsTrainingOptions(p_empty=0.8, p_paraphrase=0.5)


def test_classifier_on_held_out_real_digits():
    classifier = load_digits_classifier()
    rgb, labels, colours = coloured_split("test")  # images neither model was trained on
    digit_pred, colour_pred = classify_images(rgb, classifier)
    assert (digit_pred == labels).float().mean() >= 0.95
    assert (colour_pred == colours).float().mean() >= 0.99
    assert classifier.features(rgb[:4]).shape == (4, classifier.config["feature_dim"])


def test_classify_images_accepts_pil_and_other_sizes():
    from PIL import Image

    classifier = load_digits_classifier()
    rgb, labels, _ = coloured_split("test")
    rgb = rgb[::40]
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for im in rgb]
    from_pil = classify_images(pil, classifier)
    from_tensor = classify_images(rgb, classifier)
    assert torch.equal(from_pil[0], from_tensor[0]) and torch.equal(from_pil[1], from_tensor[1])
    big = torch.nn.functional.interpolate(rgb, size=(64, 64), mode="nearest")
    assert (classify_images(big, classifier)[0] == labels[::40]).float().mean() >= 0.9


def test_classifier_training_smoke(tmp_path):
    out = tmp_path / "clf.safetensors"
    model = train_classifier(ClassifierTrainingOptions(output_path=str(out), epochs=1, batch_size=256))
    reloaded = load_digits_classifier(path=out)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x)[0], reloaded(x)[0])
    assert out.read_bytes()[:8] != b"PK\x03\x04"  # safetensors, not a pickled zip


def test_resolve_model():
    assert resolve_model("digits") == str(digits.MODEL_DIR)
    assert resolve_model("digits-flow") == str(digits.FLOW_MODEL_DIR)
    assert (Path(resolve_model("digits")) / "model_index.json").is_file()
    assert resolve_model("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    assert resolve_model("/some/local/path") == "/some/local/path"


def test_resolve_model_trains_on_first_use_when_assets_are_missing(tmp_path, monkeypatch, caplog):
    calls = []

    def fake_train(opts):
        calls.append(opts)
        (Path(opts.output_dir)).mkdir(parents=True)
        (Path(opts.output_dir) / "model_index.json").write_text("{}")
        return Path(opts.output_dir)

    monkeypatch.setattr(digits.paths, "MODEL_DIR", tmp_path / "missing")
    monkeypatch.setattr(digits.build, "train_pipeline", fake_train)
    monkeypatch.setenv("ERASE_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level("WARNING", logger="erase.digits"):
        first = resolve_model("digits")
    assert first == str(tmp_path / "cache" / "digits-sd") and len(calls) == 1
    assert "training it now" in caplog.text
    assert resolve_model("digits") == first and len(calls) == 1  # cached: not trained again


def _rebuild(train, opts, committed: Path) -> Path:
    """`train(opts)` with the committed build's torch thread count (CPU kernels split their sums by
    thread), whatever this machine's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(json.loads((committed / "digits_training.json").read_text())["torch_threads"])
    try:
        return Path(train(opts))
    finally:
        torch.set_num_threads(threads)


def _quick_quality(pipe, **call) -> float:
    """Digit-and-colour accuracy of 8 images for one colour of each digit, by the held-out classifier."""
    pipe.set_progress_bar_config(disable=True)
    classifier = load_digits_classifier()
    hits = []
    for d in range(10):
        colour = COLOURS[d % len(COLOURS)]
        images = pipe(prompt_for(d, colour), num_images_per_prompt=8, num_inference_steps=digits.DEFAULT_STEPS,
                      guidance_scale=digits.DEFAULT_GUIDANCE, generator=torch.Generator().manual_seed(d), output_type="pt",
                      **call).images
        digit_pred, colour_pred = classify_images(images, classifier)
        hits.append(((digit_pred == d) & (colour_pred == COLOURS.index(colour))).float())
    return float(torch.cat(hits).mean())


@pytest.mark.slow
def test_full_training_reaches_quality(tmp_path):
    """The full recipe from scratch (about 9 minutes on 2 CPU cores), then a quick quality check.

    Run with the committed build's torch thread count, the rebuild must equal the committed weights bit for bit."""
    from diffusers import StableDiffusionPipeline

    folder = _rebuild(train_pipeline, DigitsTrainingOptions(output_dir=str(tmp_path / "digits-sd")), digits.MODEL_DIR)
    for part in ("unet", "vae", "text_encoder"):
        new, committed = (load_file(str(f / part / "diffusion_pytorch_model.safetensors")) if part != "text_encoder"
                          else load_file(str(f / part / "model.safetensors")) for f in (Path(folder), digits.MODEL_DIR))
        assert new.keys() == committed.keys() and all(torch.equal(new[k], committed[k]) for k in new), part
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert _quick_quality(pipe) >= 0.85


@pytest.mark.slow
def test_full_flow_training_rebuilds_the_committed_weights(tmp_path):
    """digits-flow from scratch (about 14 minutes on 2 CPU cores), bit for bit the committed weights when
    run with the committed build's torch thread count; then a quick quality check."""
    from diffusers import StableDiffusion3Pipeline

    folder = _rebuild(train_flow_pipeline, FlowTrainingOptions(output_dir=str(tmp_path / "digits-flow")), digits.FLOW_MODEL_DIR)
    for part, name in (("transformer", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model"),
                       ("text_encoder_2", "model")):
        new, committed = (load_file(str(f / part / f"{name}.safetensors")) for f in (Path(folder), digits.FLOW_MODEL_DIR))
        assert new.keys() == committed.keys() and all(torch.equal(new[k], committed[k]) for k in new), part
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert _quick_quality(pipe, max_sequence_length=flow_build.TEXT_WINDOW) >= 0.85
