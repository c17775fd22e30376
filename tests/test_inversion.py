"""erase/inversion.py: the captions, the denoising loss the attacks lower (noised with the training
schedule on every family and prediction type), and the inversion trainer."""

from __future__ import annotations

import json

import pytest
import torch

from erase.inversion import InversionSettings, inversion_captions


def test_inversion_captions_replace_the_name_or_prepend():
    assert inversion_captions(["a red handwritten digit seven", "digit 7"], "seven", "<c>") == [
        "a red handwritten digit <c>", "<c> digit 7"]


def _unet_inputs(pipe, latents: torch.Tensor, t: int) -> tuple[torch.Tensor, dict]:
    """What the attack's loss feeds the UNet at timestep t: its x_t and its keyword arguments."""
    from erase.inversion import denoising_loss
    from erase.objectives import training_scheduler

    seen = {}

    def grab(module, args, kwargs):
        seen["x_t"], seen["kwargs"] = args[0].detach().clone(), kwargs

    handle = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            denoising_loss(pipe, training_scheduler(pipe.scheduler), latents, torch.full((len(latents),), t),
                            ["a red handwritten digit seven"] * len(latents), torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return seen["x_t"], seen["kwargs"]


def _euler_v_pipeline():
    from diffusers import EulerDiscreteScheduler

    from conftest import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    return pipe


@pytest.mark.parametrize("family", ["sdxl", "euler-v"])
def test_the_attack_noises_with_the_training_schedule_after_sampling(family, tiny_family_paths):
    """After the pipeline has sampled, Euler's own add_noise would add sigma = 0 (x_t == x0): the attack's
    x_t must differ from x0 and grow with t, on SDXL (Euler) and on an Euler v-prediction model (whose
    velocity target the inference scheduler cannot give). SDXL's size ids are the latents' images'."""
    from erase.sd import generate, load_pipeline

    pipe = load_pipeline(str(tiny_family_paths["sdxl"])) if family == "sdxl" else _euler_v_pipeline()
    generate(pipe, ["a red handwritten digit seven"], [0], 2, 5.0)  # leaves the scheduler at its last step
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))  # 32 px images
    distances = []
    for t in (10, 250, 750):
        x_t, kwargs = _unet_inputs(pipe, latents, t)
        distances.append(float((x_t - latents).norm()))
        if family == "sdxl":
            assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]
    assert distances[0] > 0 and distances[0] < distances[1] < distances[2]


def test_the_inversion_runs_on_an_euler_v_prediction_model():
    """Random training timesteps are not in an Euler inference schedule (an IndexError before)."""
    from erase.inversion import train_inversion
    from erase.sd import encode_images, generate

    pipe = _euler_v_pipeline()
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        part.requires_grad_(False)
    latents = encode_images(pipe, generate(pipe, ["a red handwritten digit seven"], [0], 2, 5.0))
    vectors, trace = train_inversion(pipe, latents, ["a red handwritten digit <erased-concept>"],
                                     InversionSettings(steps=3, batch_size=2))
    assert len(vectors) == 1 and len(trace) == 1 and torch.isfinite(vectors[0]).all()


def test_several_vectors_are_learned_together_in_place_of_the_name(tiny_sd_path):
    """N placeholder words stand where the concept's name was; each text encoder learns (N, D), and the
    vectors part ways from their common start (their positions tell them apart)."""
    from erase.inversion import inversion_tokens, train_inversion
    from erase.sd import encode_images, generate, load_pipeline

    assert inversion_tokens(1) == ["<erased-concept>"] and inversion_tokens(3)[2] == "<erased-concept-2>"
    with pytest.raises(ValueError, match="inversion-vectors must be >= 1"):
        inversion_tokens(0)
    settings = InversionSettings(steps=30, batch_size=2, lr=0.05, vectors=3)
    assert inversion_captions(["a red handwritten digit seven"], "seven", settings.phrase) == [
        "a red handwritten digit <erased-concept-0> <erased-concept-1> <erased-concept-2>"]
    pipe = load_pipeline(str(tiny_sd_path))
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        part.requires_grad_(False)
    latents = encode_images(pipe, generate(pipe, ["a red handwritten digit seven"] * 2, [0, 1], 2, 5.0))
    captions = inversion_captions(["a red handwritten digit seven"] * 2, "seven", settings.phrase)
    (vectors,), trace = train_inversion(pipe, latents, captions, settings)
    assert vectors.shape == (3, pipe.text_encoder.config.hidden_size)
    assert (vectors[0] - vectors[1]).abs().max() > 0 and (vectors[1] - vectors[2]).abs().max() > 0
    assert torch.isfinite(vectors).all() and len(trace) == 1


def test_several_vectors_load_with_diffusers_own_loader_as_one_multi_vector_token(tiny_sd_path, tmp_path):
    """The report's safetensors for N vectors loads with `load_textual_inversion` under <erased-concept>,
    which diffusers expands in a prompt, and encodes exactly as the attack's N placeholder words did."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from erase.sd import encode_prompts
    from erase.tokens import PlaceholderTokens
    from eval.attack_report import inversion_state_dict

    settings = InversionSettings(vectors=3)
    width = json.loads((tiny_sd_path / "text_encoder" / "config.json").read_text())["hidden_size"]
    vectors = torch.randn(3, width, generator=torch.Generator().manual_seed(0))
    save_file(inversion_state_dict({"token": settings.phrase, "vectors": 3, "embeddings": [vectors.flatten().tolist()]}),
              str(tmp_path / "three.safetensors"))
    plain = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    plain.load_textual_inversion(str(tmp_path / "three.safetensors"), token="<erased-concept>")
    ours = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    with PlaceholderTokens(ours, settings.tokens) as place:
        place.set([vectors])
        expected = encode_prompts(ours, [f"a red handwritten digit {settings.phrase}"]).hidden_states
    prompt = plain.maybe_convert_prompt("a red handwritten digit <erased-concept>", plain.tokenizer)
    torch.testing.assert_close(encode_prompts(plain, [prompt]).hidden_states, expected, rtol=0, atol=0)


def test_an_fp16_attack_scales_its_loss_where_the_gradient_would_underflow(tiny_sd_path):
    """Under fp16 the gradient that reaches the vectors through the UNet's cross-attention is a small
    number in half precision: with the keys and values scaled by 1e-4 every entry underflows to 0
    (measured: 32 of 32) and an unscaled attack never moves. Both attacks scale the loss as GradScaler
    does under fp16, and only under fp16."""
    from erase.inversion import loss_scaler, starting_vectors, train_inversion
    from erase.sd import encode_images, generate, load_pipeline
    from erase.tokens import PlaceholderTokens

    full = load_pipeline(str(tiny_sd_path))
    latents = encode_images(full, generate(full, ["a photo of a nude person"] * 2, [0, 1], 2, 5.0)).half()
    pipe = load_pipeline(str(tiny_sd_path), dtype=torch.float16)
    assert loss_scaler(pipe).is_enabled() and not loss_scaler(full).is_enabled()
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "attn2.to_k" in name or "attn2.to_v" in name:
                p.mul_(1e-4)
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        part.requires_grad_(False)
    settings = InversionSettings(steps=2, batch_size=2, lr=0.05)
    with PlaceholderTokens(pipe, settings.tokens) as place:
        (start,) = starting_vectors(place, 1)
    (vectors,), _ = train_inversion(pipe, latents, inversion_captions(["a photo of a nude person"] * 2, "nude", settings.phrase), settings)
    assert torch.isfinite(vectors).all() and bool((vectors != start).all())
