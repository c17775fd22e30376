"""What differs per model family, in one place: which module denoises and which stay frozen, how the
denoiser is called, and how flow-matching models are noised.

| family | pipeline | denoiser | conditioning | x_t and target |
|---|---|---|---|---|
| SD 1.x / 2.x | StableDiffusionPipeline | `unet` | CLIP hidden states | DDPM; noise or velocity (2.x) |
| SDXL | StableDiffusionXLPipeline | `unet` | two CLIPs + pooled + size ids | DDPM; noise |
| SD3 / 3.5 | StableDiffusion3Pipeline | `transformer` (MMDiT) | CLIP-L + CLIP-G (+ T5) sequence, pooled | flow matching |
| FLUX.1 | FluxPipeline | `transformer` | T5 sequence, CLIP-L pooled, guidance (dev) | flow matching, packed 2x2 latents |

Flow matching (Esser et al. 2024, SD3 paper Sec. 2; what diffusers' SD3 / Flux training scripts do):
x_t = (1 - sigma) x_0 + sigma eps, the model predicts the velocity eps - x_0; sigma = u shifted, with
u ~ logit-normal(0, 1). The shift is the scheduler's: SD3's static `shift` (sigma = s u / (1 + (s - 1) u)),
Flux's resolution-dependent one (mu grows linearly with the image's token count between
`base_image_seq_len` and `max_image_seq_len`; sigma = e^mu / (e^mu + 1/u - 1)), as the pipelines sample.
Timesteps are carried as 1000 sigma, the pipelines' convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from erase.conditioning import Conditioning, unet_kwargs

__all__ = ["FLUX_GUIDANCE", "FlowMatching", "denoiser", "denoiser_name", "family", "frozen_copy", "frozen_parts", "hold_frozen",
           "is_flow", "latent_image_ids", "pack_latents", "predict", "release_frozen", "unpack_latents"]

# FluxPipeline's default guidance: what a guidance-distilled Flux (dev) is conditioned on in training and in the attacks.
FLUX_GUIDANCE = 3.5


def family(pipe) -> str:
    """`sd` (1.x, 2.x), `sdxl`, `sd3` or `flux`, from the pipeline's class."""
    name = type(pipe).__name__
    return {"StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}.get(name, "sd")


def is_flow(pipe) -> bool:
    return family(pipe) in ("sd3", "flux")


def denoiser_name(pipe) -> str:
    """The pipeline component an erasure trains: `unet`, or `transformer` for SD3 and Flux."""
    return "transformer" if is_flow(pipe) else "unet"


def denoiser(pipe) -> torch.nn.Module:
    return getattr(pipe, denoiser_name(pipe))


def frozen_parts(pipe) -> list[str]:
    """The components an erasure never trains: the VAE and every text encoder."""
    return [name for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, name, None) is not None]


def hold_frozen(pipe, device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """Put the frozen VAE and text encoder(s) on `device` in `dtype` for generation and encoding
    (a VAE whose config asks to be upcast, as SDXL's does, stays fp32 under fp16); return their
    original weights (which stay where they were) for `release_frozen`."""
    originals = {}
    for name in frozen_parts(pipe):
        module = getattr(pipe, name).requires_grad_(False)
        originals[name] = dict(module.state_dict())  # the tensors themselves, not copies
        upcast = name == "vae" and dtype == torch.float16 and getattr(module.config, "force_upcast", False)
        module.to(device, torch.float32 if upcast else dtype)
    return originals


def release_frozen(pipe, originals: dict[str, dict[str, torch.Tensor]]) -> None:
    """Swap the original weights back in (bit-identical in the saved pipeline) and free the device copies."""
    for name, state in originals.items():
        getattr(pipe, name).load_state_dict(state, assign=True)


def frozen_copy(unet: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """ESD's teacher: a frozen copy of the UNet (or transformer) made directly in `dtype` (no transient fp32 copy)."""
    with torch.device("meta"):
        teacher = type(unet).from_config(unet.config).to(dtype)
    teacher.to_empty(device=unet.device)
    teacher.load_state_dict(unet.state_dict())  # copy_ casts to dtype
    return teacher.requires_grad_(False).eval()


# ----------------------------------------------------------------------------- the model call


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Flux's 2x2 patches: (B, C, H, W) -> (B, H/2 * W/2, 4C), as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height` x `width` (latent pixels, not image pixels)."""
    b, _, d = packed.shape
    x = packed.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """Flux's position ids of the packed latent tokens, (H/2 * W/2, 3): (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def _core(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel's wrapped model (FSDP2 keeps the class)


def predict(model: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
            cond: Conditioning | torch.Tensor) -> torch.Tensor:
    """The denoiser's prediction at (x_t, t | cond), in the shape of `noisy_latents` (B, C, h, w), for
    every family: the one place a UNet or a transformer is called."""
    core = _core(model)
    if isinstance(core, FluxTransformer2DModel):
        _, _, h, w = noisy_latents.shape
        guidance = None
        if core.config.guidance_embeds:
            guidance = torch.full((len(noisy_latents),), FLUX_GUIDANCE, device=noisy_latents.device, dtype=torch.float32)
        text = cond.hidden_states
        out = model(hidden_states=pack_latents(noisy_latents), timestep=timesteps / 1000, guidance=guidance,
                    pooled_projections=cond.text_embeds, encoder_hidden_states=text,
                    txt_ids=torch.zeros(text.shape[1], 3, device=text.device, dtype=text.dtype),
                    img_ids=latent_image_ids(h, w, noisy_latents.device, text.dtype)).sample
        return unpack_latents(out, h, w)
    if isinstance(core, SD3Transformer2DModel):
        return model(hidden_states=noisy_latents, timestep=timesteps, encoder_hidden_states=cond.hidden_states,
                     pooled_projections=cond.text_embeds).sample
    return model(noisy_latents, timesteps, **unet_kwargs(cond)).sample


# ----------------------------------------------------------------------------- flow matching


@dataclass
class FlowMatching:
    """The forward process of a flow-matching model, from its FlowMatchEulerDiscreteScheduler's config:
    what training and the attacks noise with (the counterpart of the UNet families' DDPMScheduler)."""

    shift: float = 1.0
    dynamic: bool = False  # Flux: the shift depends on the image's token count
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    logit_mean: float = 0.0  # the training scripts' logit-normal density
    logit_std: float = 1.0
    num_train_timesteps: int = 1000

    @classmethod
    def from_scheduler(cls, scheduler) -> FlowMatching:
        c = scheduler.config
        return cls(shift=c.shift, dynamic=c.use_dynamic_shifting, base_shift=c.base_shift, max_shift=c.max_shift,
                   base_image_seq_len=c.base_image_seq_len, max_image_seq_len=c.max_image_seq_len,
                   num_train_timesteps=c.num_train_timesteps)

    @property
    def config(self) -> FlowMatching:  # read like a diffusers scheduler's config
        return self

    def shifted(self, u: torch.Tensor, latent_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """sigma from u in (0, 1): the scheduler's shift (static, or Flux's for this latent size)."""
        if self.dynamic:
            seq_len = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
            slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
            mu = self.base_shift + slope * (seq_len - self.base_image_seq_len)
            return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        return self.shift * u / (1 + (self.shift - 1) * u)

    def draw_timesteps(self, n: int, g: torch.Generator, latent_shape) -> torch.Tensor:
        """n timesteps (1000 sigma, fp32) on the generator's device: u logit-normal, then shifted."""
        u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=g, device=g.device))
        return self.shifted(u, latent_shape) * self.num_train_timesteps

    def noisy_latents_and_target(self, latents: torch.Tensor, noise: torch.Tensor,
                                 timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = (1 - sigma) x_0 + sigma eps and the velocity eps - x_0 the model should predict."""
        sigma = (timesteps.float() / self.num_train_timesteps).view(-1, *[1] * (latents.dim() - 1)).to(latents.device)
        return ((1 - sigma) * latents + sigma * noise).to(latents.dtype), noise - latents
