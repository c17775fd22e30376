"""Training the embedded pipeline from scratch: VAE, then UNet (EMA), text encoder frozen at init."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from erase.atomic import replace_path
from erase.command import versions
from erase.digits.data import RESOLUTION, batches, coloured_split
from erase.digits.paths import MODEL_DIR
from erase.digits.prompts import (
    COLOURS,
    build_tokenizer,
    paraphrases_for,
    prompt_for,
    training_prompts,
    unknown_tokens,
)

logger = logging.getLogger("erase.digits")


@dataclass
class DigitsTrainingOptions:
    """Options of `train_pipeline`; saved as ``digits_training.json`` next to the weights."""

    output_dir: str = field(default=str(MODEL_DIR), metadata={"help": "where the pipeline folder is written"})
    seed: int = field(default=0, metadata={"help": "seeds weights, data order, noise and prompt choice"})
    vae_steps: int = field(default=600, metadata={"help": "optimisation steps of the autoencoder"})
    vae_learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate of the autoencoder"})
    vae_kl_weight: float = field(default=1e-6, metadata={"help": "weight of the KL term of the autoencoder"})
    max_train_steps: int = field(default=1400, metadata={"help": "optimisation steps of the UNet"})
    train_batch_size: int = field(default=64, metadata={"help": "images per step (VAE and UNet)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate of the UNet"})
    lr_warmup_steps: int = field(default=100, metadata={"help": "linear warm-up, then cosine decay"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the UNet weights; the EMA is saved"})
    p_paraphrase: float = field(default=0.3, metadata={"help": "probability of a paraphrase instead of the template"})
    p_empty: float = field(default=0.1, metadata={"help": "probability of the empty prompt (classifier-free guidance)"})
    limit_images: int | None = field(default=None,
                                     metadata={"help": "train on a seeded subset of N images (smoke tests)"})

    def __post_init__(self) -> None:
        if min(self.vae_steps, self.max_train_steps) < 1 or self.train_batch_size < 1:
            raise ValueError("vae_steps, max_train_steps and train_batch_size must be >= 1")
        if not 0 <= self.p_paraphrase + self.p_empty <= 1 or min(self.p_paraphrase, self.p_empty) < 0:
            raise ValueError("p_paraphrase and p_empty must be >= 0 and sum to at most 1")
        if self.limit_images is not None and self.limit_images < 1:
            raise ValueError("limit_images must be >= 1")


def build_vae(**config):
    """The embedded models' autoencoder (32x32x3 <-> 8x8x4), untrained; `config`: extra config fields."""
    from diffusers import AutoencoderKL

    # Why a multi-group norm: with a single group per layer the colours washed out.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 32), norm_num_groups=4, **config,
    )


def build_components(seed: int = 0) -> dict:
    """Untrained pipeline components from configs (weights seeded by `seed`)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        projection_dim=64,
    )
    vae = build_vae()
    # Why cross-attention only at the 4x4 level: it is where digit identity lives, and it is cheap.
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
        norm_num_groups=32,
    )
    # Why these betas and flags: the Stable Diffusion v1 schedule, so the usual samplers apply.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    return {"vae": vae, "text_encoder": _frozen_text_encoder(CLIPTextModel(text_config)), "tokenizer": tokenizer,
            "unet": unet, "scheduler": scheduler}


@torch.no_grad()
def _frozen_text_encoder(text_encoder):
    """The text encoder stays at its random initialisation; words must still be told apart.

    Why rescale: at CLIP's default init (std 0.02 everywhere) the position embeddings and the
    random layers swamp the token identity, and "five" and "nine" come out at cosine 0.96. With
    unit-variance token embeddings each word keeps a nearly orthogonal direction of its own.
    """
    text_encoder.get_input_embeddings().weight.normal_(0.0, 1.0)
    return text_encoder.eval().requires_grad_(False)


def train_vae(vae, pixels: torch.Tensor, opts: DigitsTrainingOptions, generator: torch.Generator) -> None:
    """Fit the autoencoder to `pixels` (N, 3, 32, 32) in [-1, 1]: MSE + a small KL term."""
    optimizer = torch.optim.Adam(vae.parameters(), lr=opts.vae_learning_rate)
    vae.train()
    bar = tqdm(batches(len(pixels), opts.train_batch_size, opts.vae_steps, generator), total=opts.vae_steps,
               desc="digits VAE")
    for index in bar:
        posterior = vae.encode(pixels[index]).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        loss = F.mse_loss(recon, pixels[index]) + opts.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def _encode_latent_stats(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (N, 4, 8, 8) of every image, unscaled."""
    stats = [vae.encode(chunk).latent_dist for chunk in pixels.split(256)]
    return torch.cat([s.mean for s in stats]), torch.cat([s.std for s in stats])


@torch.no_grad()
def _prompt_embeddings(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """(P, 77, 64) hidden states exactly as the pipeline's encode_prompt computes them."""
    for prompt in prompts:
        if unknown_tokens(tokenizer, prompt):
            raise ValueError(f"training prompt {prompt!r} has unknown tokens {unknown_tokens(tokenizer, prompt)}")
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def _prompt_index_table() -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """All prompts, and for every (digit, colour) the index of its template and paraphrases."""
    prompts = training_prompts()
    where = {p: i for i, p in enumerate(prompts)}
    template = torch.tensor([[where[prompt_for(d, c)] for c in COLOURS] for d in range(10)])  # (10, C)
    para = torch.tensor([[[where[p] for p in paraphrases_for(d, c, "all")] for c in COLOURS] for d in range(10)])
    return prompts, template, para  # para: (10, C, K)


def _choose_prompts(digits, colours, template, para, opts, generator) -> torch.Tensor:
    """Per sample: the empty prompt (index 0), a random paraphrase, or the template."""
    u = torch.rand(len(digits), generator=generator)
    k = torch.randint(para.shape[-1], (len(digits),), generator=generator)
    chosen = template[digits, colours]
    chosen = torch.where(u < opts.p_empty + opts.p_paraphrase, para[digits, colours, k], chosen)
    return torch.where(u < opts.p_empty, torch.zeros_like(chosen), chosen)


def _lr_lambda(opts: DigitsTrainingOptions):
    def factor(step: int) -> float:
        if step < opts.lr_warmup_steps:
            return (step + 1) / opts.lr_warmup_steps
        progress = (step - opts.lr_warmup_steps) / max(1, opts.max_train_steps - opts.lr_warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_unet(unet, scheduler, latent_stats, digits, colours, embeddings, opts, generator):
    """Noise-prediction training of the UNet; returns the EMA copy of its weights."""

    def noised(latents):
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        return scheduler.add_noise(latents, noise, timesteps), timesteps, noise

    def call(model, noisy_latents, timesteps, prompt_ids):
        return model(noisy_latents, timesteps, encoder_hidden_states=embeddings[prompt_ids]).sample

    return train_denoiser(unet, noised, call, latent_stats, digits, colours, opts, generator, desc="digits UNet")


def train_denoiser(model, noised, call, latent_stats, digits, colours, opts, generator, desc: str, ema=None):
    """The training loop both embedded models share; returns the EMA copy of the weights (`ema`: the
    copy to keep it in, default a deep copy of `model`).

    noised(latents) -> (x_t, t, target) draws the noise (DDPM or flow matching); call(model, x_t, t,
    prompt_ids) is the model's prediction. Every random draw comes from `generator`, in a fixed order."""
    mean, std = latent_stats  # (N, 4, 8, 8) each, already multiplied by the scaling factor
    _, template, para = _prompt_index_table()
    ema = (copy.deepcopy(model) if ema is None else ema).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.learning_rate, weight_decay=0.0)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(opts))
    model.train()
    bar = tqdm(batches(len(mean), opts.train_batch_size, opts.max_train_steps, generator), total=opts.max_train_steps,
               desc=desc)
    for step, index in enumerate(bar):
        # Sample latents from the posterior, as Stable Diffusion training does.
        latents = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        noisy_latents, timesteps, target = noised(latents)
        prompt_ids = _choose_prompts(digits[index], colours[index], template, para, opts, generator)
        loss = F.mse_loss(call(model, noisy_latents, timesteps, prompt_ids), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        _ema_update(ema, model, min(opts.ema_decay, (1 + step) / (10 + step)))
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema.eval()


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for ema_p, p in zip(ema.parameters(), model.parameters(), strict=True):
        ema_p.lerp_(p, 1 - decay)


def train_pipeline(opts: DigitsTrainingOptions) -> Path:
    """Train VAE then UNet on the generator split; write a complete pipeline folder to opts.output_dir."""
    from diffusers import StableDiffusionPipeline

    start = time.time()
    generator = torch.Generator().manual_seed(opts.seed)
    parts = build_components(opts.seed)
    latent_stats, digits, colours = fit_autoencoder(parts["vae"], opts, generator)
    embeddings = _prompt_embeddings(parts["tokenizer"], parts["text_encoder"], training_prompts())
    logger.info("training the digits UNet for %d steps (batch %d)", opts.max_train_steps, opts.train_batch_size)
    parts["unet"] = train_unet(parts["unet"], parts["scheduler"], latent_stats, digits, colours, embeddings, opts, generator)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return save_pipeline(pipe, opts, start)


def fit_autoencoder(vae, opts: DigitsTrainingOptions, generator: torch.Generator):
    """Train `vae` on the generator split (the first draws of `generator`) and set its scaling factor;
    returns the scaled posterior (mean, std) of every image, and their digits and colours."""
    rgb, digits, colours = coloured_split("generator")
    if opts.limit_images is not None:
        keep = torch.randperm(len(rgb), generator=generator)[: opts.limit_images]
        rgb, digits, colours = rgb[keep], digits[keep], colours[keep]
    pixels = rgb * 2 - 1  # the VAE works in [-1, 1]
    logger.info("training the digits VAE on %d images for %d steps", len(pixels), opts.vae_steps)
    train_vae(vae, pixels, opts, generator)
    mean, std = _encode_latent_stats(vae, pixels)
    # Why: the pipeline multiplies latents by scaling_factor; unit variance suits the noise schedule.
    scaling_factor = float(1.0 / (mean.var() + std.pow(2).mean()).sqrt())
    vae.register_to_config(scaling_factor=scaling_factor)
    return (mean * scaling_factor, std * scaling_factor), digits, colours


def save_pipeline(pipe, opts: DigitsTrainingOptions, start: float) -> Path:
    """Write `pipe` and its training record (options, seconds, threads, versions) to opts.output_dir, atomically."""
    record = {"options": asdict(opts), "train_seconds": round(time.time() - start, 1),
              "torch_threads": torch.get_num_threads(), "versions": versions()}
    return replace_path(opts.output_dir, lambda tmp: _save_pipeline(pipe, tmp, record))


def _save_pipeline(pipe, folder: Path, record: dict) -> None:
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "digits_training.json").write_text(json.dumps(record, indent=2) + "\n")
