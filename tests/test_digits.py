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
    DIGIT_WORDS,
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
    training_prompts,
    unknown_tokens,
    vocabulary_words,
)

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


def _load_in_fresh_process(folder: Path, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _LOAD_AND_GENERATE, str(folder)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_committed_pipeline_loads_with_plain_diffusers(tmp_path):
    _load_in_fresh_process(digits.MODEL_DIR, tmp_path)


def test_committed_assets_fit_in_20_mb():
    files = [p for p in digits.MODEL_DIR.rglob("*") if p.is_file()] + [digits.CLASSIFIER_PATH]
    assert sum(p.stat().st_size for p in files) <= 20 * 1024 * 1024
    assert not list(digits.MODEL_DIR.rglob("*.bin")) and not list(digits.MODEL_DIR.rglob("*.pt"))


def test_prompt_template():
    assert prompt_for(7, "red") == "a red handwritten digit seven"
    assert len(DIGIT_WORDS) == 10 and {"red", "green", "blue", "white"} <= set(COLOURS)
    with pytest.raises(ValueError):
        prompt_for(7, "purple")


def test_every_vocabulary_word_is_one_token():
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    for word in vocabulary_words():
        assert tokenizer.tokenize(word) == [word + "</w>"]
        assert vocab[word + "</w>"] != tokenizer.unk_token_id


def test_training_prompts_have_no_unknown_tokens():
    tokenizer = build_tokenizer()
    prompts = training_prompts()
    assert prompts[0] == "" and len(prompts) > 40
    for prompt in prompts:
        assert unknown_tokens(tokenizer, prompt) == [], prompt
        ids = tokenizer(prompt).input_ids
        assert len(ids) == len(prompt.split()) + 2  # one token per word plus start and end
    assert unknown_tokens(tokenizer, "a red digit ~") == ["<|endoftext|>"]  # the check itself works


def test_committed_tokenizer_matches_the_code():
    from transformers import CLIPTokenizer

    saved = CLIPTokenizer.from_pretrained(digits.MODEL_DIR / "tokenizer")
    assert saved.model_max_length == 77
    assert saved.get_vocab() == build_tokenizer().get_vocab()
    for prompt in training_prompts()[:50]:
        assert saved(prompt).input_ids == build_tokenizer()(prompt).input_ids


def test_splits_are_disjoint_and_cover_the_dataset():
    from sklearn.datasets import load_digits

    sizes = {part: len(digits.load_split(part)[1]) for part in digits.SPLITS}
    assert sum(sizes.values()) == len(load_digits().target)
    parts = [set(r) for r in digits.SPLITS.values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1 :])


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


@pytest.mark.slow
def test_full_training_reaches_quality(tmp_path):
    """The full recipe from scratch (about 9 minutes on 2 CPU cores), then a quick quality check.

    Run with the committed build's torch thread count, the rebuild must equal the committed weights bit for bit."""
    from diffusers import StableDiffusionPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(json.loads((digits.MODEL_DIR / "digits_training.json").read_text())["torch_threads"])
    try:  # CPU kernels split their sums by thread: the committed build's count, whatever this machine's
        folder = train_pipeline(DigitsTrainingOptions(output_dir=str(tmp_path / "digits-sd")))
    finally:
        torch.set_num_threads(threads)
    for part in ("unet", "vae", "text_encoder"):
        new, committed = (load_file(str(f / part / "diffusion_pytorch_model.safetensors")) if part != "text_encoder"
                          else load_file(str(f / part / "model.safetensors")) for f in (Path(folder), digits.MODEL_DIR))
        assert new.keys() == committed.keys() and all(torch.equal(new[k], committed[k]) for k in new), part
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_digits_classifier()
    hits = []
    for d in range(10):
        colour = COLOURS[d % len(COLOURS)]
        images = pipe(prompt_for(d, colour), num_images_per_prompt=8, num_inference_steps=digits.DEFAULT_STEPS,
                      guidance_scale=digits.DEFAULT_GUIDANCE, generator=torch.Generator().manual_seed(d),
                      output_type="pt").images
        digit_pred, colour_pred = classify_images(images, classifier)
        hits.append(((digit_pred == d) & (colour_pred == COLOURS.index(colour))).float())
    assert torch.cat(hits).mean() >= 0.85
