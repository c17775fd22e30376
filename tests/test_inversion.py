"""erase/inversion.py: the captions, the denoising loss the attacks lower (noised with the training
schedule on every family and prediction type), and the inversion trainer."""

from __future__ import annotations

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
    from conftest import build_tiny_pipeline
    from diffusers import EulerDiscreteScheduler

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
