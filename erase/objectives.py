"""Losses of the Stable Diffusion path (SalUn, Fan et al. ICLR 2024; ESD, Gandikota et al. 2023).

Every conditioning argument (`*_hidden_states`) is the text encoder's hidden states (B, 77, D)
or an `erase.conditioning.Conditioning`, which also carries SDXL's added conditioning. Targets
are in the model's own prediction space: noise, or the velocity for v-prediction models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from erase.conditioning import Conditioning, cat
from erase.families import FlowMatching, predict

__all__ = [
    "ESD_TARGETS",
    "anchor_target",
    "draw_timesteps",
    "esd_loss",
    "esd_target",
    "guided_prediction",
    "mse_per_sample",
    "noise_target",
    "noised",
    "noisy_latents_and_target",
    "salun_loss",
    "saliency_loss",
    "step_generator",
    "training_scheduler",
]


def mse_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, (B,), in fp32."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def guided_prediction(
    unet: torch.nn.Module,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor | Conditioning,
    uncond_hidden_states: torch.Tensor | Conditioning,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance in one batched pass: eps_cfg = (1 + g) eps(x_t, c) - g eps(x_t, empty)."""
    model_pred = predict(unet, torch.cat([noisy_latents, noisy_latents]), torch.cat([timesteps, timesteps]),
                         cat([encoder_hidden_states, uncond_hidden_states]))
    eps_cond, eps_uncond = model_pred.chunk(2)
    return (1 + guidance_scale) * eps_cond - guidance_scale * eps_uncond


def saliency_loss(
    unet: torch.nn.Module,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    encoder_hidden_states: torch.Tensor | Conditioning,
    uncond_hidden_states: torch.Tensor | Conditioning,
    guidance_scale: float = 7.5,
) -> torch.Tensor:
    """Forget loss whose gradient gives the SalUn mask (SalUn Eq. 8, the MSE of the
    classifier-free-guided prediction): eps_cfg = (1 + g) eps(x_t, c) - g eps(x_t, empty).

    Returned negated as in the paper; the sign does not change |gradient|.
    noisy_latents, noise: (B, 4, h, w); *_hidden_states: (B, 77, D), or a `Conditioning` (SDXL).
    """
    eps_cfg = guided_prediction(unet, noisy_latents, timesteps, encoder_hidden_states, uncond_hidden_states, guidance_scale)
    return -F.mse_loss(eps_cfg.float(), noise.float())


@torch.no_grad()
def anchor_target(unet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                  anchor_hidden_states: torch.Tensor) -> torch.Tensor:
    """SalUn's forget target: stopgrad(eps(x_t, c')), the model's own prediction under the anchor."""
    return predict(unet, noisy_latents, timesteps, anchor_hidden_states)


@torch.no_grad()
def esd_target(frozen_unet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
               encoder_hidden_states: torch.Tensor, uncond_hidden_states: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """ESD's target (Gandikota et al. 2023, Eq. 2): eps*(x_t) - eta * (eps*(x_t, c) - eps*(x_t))."""
    eps_c = predict(frozen_unet, noisy_latents, timesteps, encoder_hidden_states)
    eps_0 = predict(frozen_unet, noisy_latents, timesteps, uncond_hidden_states)
    return eps_0 - eta * (eps_c - eps_0)


def noise_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise, or the velocity for v-prediction models."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def training_scheduler(scheduler):
    """The forward process of a model's noise schedule, built from its (inference) scheduler's config:
    `FlowMatching` for the flow-matching families (SD3, Flux), otherwise the DDPM forward process of a model's noise
    schedule, built from its (inference) scheduler's
    config: what training and the attacks noise with. An inference scheduler's own `add_noise` is not
    always the forward process: Euler's (SDXL, many SD 1.5 fine-tunes) adds sigma * eps at its current
    step (sigma = 0 after sampling) and has no `get_velocity`."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatching.from_scheduler(scheduler)
    return DDPMScheduler.from_config(scheduler.config)


def noisy_latents_and_target(scheduler, latents: torch.Tensor, noise: torch.Tensor,
                             timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t and what the model should predict there, for every family; `scheduler` is a `training_scheduler`:
    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps with the noise (or velocity) as target, or flow matching's
    x_t = (1 - sigma) x_0 + sigma eps with target eps - x_0."""
    if isinstance(scheduler, FlowMatching):
        return scheduler.noisy_latents_and_target(latents, noise, timesteps)
    return scheduler.add_noise(latents, noise, timesteps), noise_target(scheduler, latents, noise, timesteps)


def step_generator(seed: int, *parts: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator on `device` that depends only on (seed, step, ...): resuming replays the same
    batches. On the device of the data, drawing a batch needs no host-device copy (and no sync)."""
    value = seed
    for p in parts:
        value = value * 1_000_003 + p
    return torch.Generator(device=device).manual_seed(value % (2**63))


def draw_timesteps(scheduler, n: int, g: torch.Generator, latent_shape) -> torch.Tensor:
    """n training timesteps on the generator's device: uniform over the DDPM steps, or flow matching's
    shifted logit-normal sigmas (as 1000 sigma) for latents of `latent_shape`."""
    if isinstance(scheduler, FlowMatching):
        return scheduler.draw_timesteps(n, g, latent_shape)
    return torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g, device=g.device)


def noised(scheduler, latents: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """x_t at a random timestep (`draw_timesteps`), by the `training_scheduler` `scheduler`.

    Drawn on the generator's device, then moved to the latents' (a no-op when they match)."""
    noise = torch.randn(latents.shape, generator=g, device=g.device).to(latents.device, latents.dtype)
    timesteps = draw_timesteps(scheduler, latents.shape[0], g, latents.shape).to(latents.device)
    noisy_latents, target = noisy_latents_and_target(scheduler, latents, noise, timesteps)
    return {"noisy_latents": noisy_latents, "timesteps": timesteps, "target": target, "noise": noise}


def salun_loss(
    unet: torch.nn.Module,
    forget: dict[str, torch.Tensor],
    retain: dict[str, torch.Tensor],
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SalUn for diffusion (SalUn Eq. 9): remap c to c' on the forget set plus beta * the
    ordinary denoising loss on the retain set.

    forget: noisy_latents, timesteps, encoder_hidden_states (c), anchor_hidden_states (c').
    retain: noisy_latents, timesteps, encoder_hidden_states, target.
    forget_loss = || eps(x_t, c) - stopgrad(eps(x_t, c')) ||^2 on the same x_t.
    The logged terms are detached tensors, not floats: reading them syncs with the device.
    """
    target = anchor_target(unet, forget["noisy_latents"], forget["timesteps"], forget["anchor_hidden_states"])
    # one forward pass for both halves (a single DDP forward per backward)
    model_pred = predict(unet, torch.cat([forget["noisy_latents"], retain["noisy_latents"]]),
                         torch.cat([forget["timesteps"], retain["timesteps"]]),
                         cat([forget["encoder_hidden_states"], retain["encoder_hidden_states"]]))
    forget_pred, retain_pred = model_pred.split([len(target), len(retain["target"])])
    forget_loss = F.mse_loss(forget_pred.float(), target.float())
    retain_loss = F.mse_loss(retain_pred.float(), retain["target"].float())
    loss = forget_loss + beta * retain_loss
    return loss, {"forget_loss": forget_loss.detach(), "retain_loss": retain_loss.detach()}


def esd_loss(
    unet: torch.nn.Module,
    frozen_unet: torch.nn.Module,
    forget: dict[str, torch.Tensor],
    eta: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ESD (Gandikota et al. 2023, Eq. 2): push eps(x_t, c) towards the frozen model's negatively
    guided prediction eps*(x_t) - eta * (eps*(x_t, c) - eps*(x_t)).

    forget: noisy_latents, timesteps, encoder_hidden_states (c), uncond_hidden_states; optionally
    teacher_hidden_states, the teacher's c where the student sees another conditioning (the
    adversarial erasure's captions: the target still comes from the clean prompt).
    """
    x, t = forget["noisy_latents"], forget["timesteps"]
    teacher = forget.get("teacher_hidden_states", forget["encoder_hidden_states"])
    target = esd_target(frozen_unet, x, t, teacher, forget["uncond_hidden_states"], eta)
    model_pred = predict(unet, x, t, forget["encoder_hidden_states"])
    loss = F.mse_loss(model_pred.float(), target.float())
    return loss, {"forget_loss": loss.detach()}


# ESD-x fine-tunes the projections that read text tokens only, ESD-u every other weight. In a UNet these
# are the cross-attention blocks (the attn2 of each attention's transformer blocks). An MMDiT (SD3, Flux)
# has no cross-attention: text and image tokens attend jointly, and the text tokens enter each joint
# block's attention through add_q_proj, add_k_proj and add_v_proj (Flux's single blocks read the merged
# stream, and SD3.5's `transformer_blocks.N.attn2` is a second self-attention of the image tokens: both
# count as ESD-u's).
_READS_TEXT = r"attentions\.\d+\.transformer_blocks\.\d+\.attn2\.|\.attn\.add_[qkv]_proj\."
ESD_TARGETS = {"esd-x": _READS_TEXT, "esd-u": rf"^(?!.*({_READS_TEXT}))"}
