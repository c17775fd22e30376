"""digits-flow: the embedded model's flow-matching twin, a StableDiffusion3Pipeline trained by rectified flow.

Why SD3's architecture (MMDiT, `SD3Transformer2DModel`) rather than Flux's: SD3 runs without T5 (the
pipeline feeds zeros in its place), so the model needs no third text encoder, and its two CLIPs and
pooled projections are what SD3.5 users erase from. It shares everything but the denoiser with
digits-sd: the data, the prompts, the tokenizer's vocabulary and the autoencoder, trained by the same
seeded steps, so the two models differ only where a UNet and a transformer differ.

- Autoencoder: `build.build_vae` with `shift_factor` 0 (SD3's pipeline reads one), trained by the
  same code, seed and draws as digits-sd's build trains its own (the tests check both builds give
  the same weights; the committed digits-sd predates this code and differs in its last bits).
- Text: CLIP-L (64 wide, its projection the identity, as SD3's) and CLIP-G (96 wide), frozen at their
  random initialisation with unit-variance token embeddings (as digits-sd's), and a `TEXT_WINDOW`-token
  window: the pipeline pads both CLIPs and T5's zeros to the tokenizer's window, and the transformer
  attends over all of it, so the window is the cost; the longest prompt an attack builds still fits.
- Transformer: 2x2 patches of the 8x8x4 latent (16 image tokens), `LAYERS` joint blocks of width 128
  (4 heads of 32), RMS q/k norms (SD3.5's).
- Noise: flow matching, sigma logit-normal with shift 1 (`erase.families.FlowMatching`, what diffusers'
  SD3 training script draws), the velocity target; the pipeline samples with FlowMatchEulerDiscrete.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erase.digits.build import (
    DigitsTrainingOptions,
    _frozen_text_encoder,
    build_vae,
    fit_autoencoder,
    save_pipeline,
    train_denoiser,
)
from erase.digits.paths import FLOW_MODEL_DIR
from erase.digits.prompts import build_tokenizer, training_prompts

logger = logging.getLogger("erase.digits")

TEXT_WINDOW = 16  # tokens per text encoder (CLIP-L, CLIP-G side by side; then as many T5 zeros)
LAYERS = 6
WIDTH, HEADS = 128, 4
CLIP_WIDTHS = (64, 96)  # CLIP-L, CLIP-G


@dataclass
class FlowTrainingOptions(DigitsTrainingOptions):
    """Options of `train_flow_pipeline` (digits-sd's, with the transformer's defaults)."""

    output_dir: str = field(default=str(FLOW_MODEL_DIR), metadata={"help": "where the pipeline folder is written"})
    max_train_steps: int = field(default=2000, metadata={"help": "optimisation steps of the transformer"})
    learning_rate: float = field(default=5e-4, metadata={"help": "peak AdamW learning rate of the transformer"})


def build_flow_components(seed: int = 0) -> dict:
    """Untrained digits-flow components (weights seeded by `seed`; the VAE is built first, as digits-sd's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vae = build_vae(shift_factor=0.0)
    tokenizers = [build_tokenizer(), build_tokenizer()]
    encoders = []
    for tokenizer, width in zip(tokenizers, CLIP_WIDTHS, strict=True):
        tokenizer.model_max_length = TEXT_WINDOW
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        config = CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=TEXT_WINDOW, bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=eos, pad_token_id=eos, projection_dim=width,
        )
        encoders.append(_frozen_text_encoder(CLIPTextModelWithProjection(config)))
    with torch.no_grad():  # CLIP-L's projection is the identity in SD3 (single-file loading relies on it)
        encoders[0].text_projection.weight.copy_(torch.eye(CLIP_WIDTHS[0]))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=LAYERS, attention_head_dim=WIDTH // HEADS,
        num_attention_heads=HEADS, joint_attention_dim=sum(CLIP_WIDTHS), caption_projection_dim=WIDTH,
        pooled_projection_dim=sum(CLIP_WIDTHS), pos_embed_max_size=8, qk_norm="rms_norm",
    )
    return {"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(shift=1.0), "vae": vae,
            "text_encoder": encoders[0], "tokenizer": tokenizers[0], "text_encoder_2": encoders[1],
            "tokenizer_2": tokenizers[1], "text_encoder_3": None, "tokenizer_3": None}


class CountedZerosAttention:
    """SD3's joint attention, in which the context's last token stands for `count` copies of itself.

    Without T5, StableDiffusion3Pipeline appends `max_sequence_length` zero rows (256 by default; the
    toolkit uses the CLIP window) to the text tokens. No positional embedding reaches the context
    stream and every other layer acts per token, so those rows stay identical through every block:
    n of them weigh in attention exactly as one of them whose logit is raised by log n. Training on
    one zero row with log n added (n log-uniform in `ZERO_ROWS`) costs one token instead of n, and
    the model serves every window a user passes: the same numbers, to rounding, as n real rows."""

    def __init__(self) -> None:
        self.log_count: torch.Tensor | None = None  # (B,): log n per sample, set before each forward

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_image = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        cq, ck = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        bias = torch.zeros(b, 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
        bias[:, 0, 0, -1] = self.log_count.to(q.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        image, context = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


ZERO_ROWS = (TEXT_WINDOW, 512)  # the T5 windows a user may pass (the pipeline allows up to 512)


def train_transformer(transformer, scheduler, latent_stats, digits, colours, conditioning, opts, generator):
    """Rectified-flow training of the transformer; returns the EMA copy of its weights.
    `conditioning`: the prompts with ONE zero row in T5's place (see `CountedZerosAttention`)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from erase.families import FlowMatching, predict

    flow = FlowMatching.from_scheduler(scheduler)
    attention = CountedZerosAttention()
    low, high = (math.log(n) for n in ZERO_ROWS)

    def noised(latents):
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = flow.draw_timesteps(len(latents), generator, latents.shape)
        noisy, target = flow.noisy_latents_and_target(latents, noise, timesteps)
        return noisy, timesteps, target

    def call(model, noisy_latents, timesteps, prompt_ids):
        attention.log_count = low + (high - low) * torch.rand(len(prompt_ids), generator=generator)
        return predict(model, noisy_latents, timesteps, conditioning[prompt_ids])

    ema = copy.deepcopy(transformer)  # the EMA starts from the same weights, with the pipeline's own attention
    transformer.set_attn_processor(attention)
    trained = train_denoiser(transformer, noised, call, latent_stats, digits, colours, opts, generator, desc="digits-flow transformer",
                             ema=ema)
    trained.set_attn_processor(JointAttnProcessor2_0())
    return trained


def train_flow_pipeline(opts: FlowTrainingOptions) -> Path:
    """Train the VAE (as digits-sd's) then the transformer; write a StableDiffusion3Pipeline folder."""
    from diffusers import StableDiffusion3Pipeline

    from erase.conditioning import Conditioning

    start = time.time()
    generator = torch.Generator().manual_seed(opts.seed)
    parts = build_flow_components(opts.seed)
    latent_stats, digits, colours = fit_autoencoder(parts["vae"], opts, generator)
    pipe = StableDiffusion3Pipeline(**parts)
    hidden, _, pooled, _ = pipe.encode_prompt(training_prompts(), None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=1)  # as the pipeline encodes them, with one zero row
    conditioning = Conditioning(hidden, pooled)
    logger.info("training the digits-flow transformer for %d steps (batch %d)", opts.max_train_steps, opts.train_batch_size)
    parts["transformer"] = train_transformer(parts["transformer"], parts["scheduler"], latent_stats, digits, colours,
                                             conditioning, opts, generator)
    return save_pipeline(StableDiffusion3Pipeline(**parts), opts, start)
