"""Concept inversion (Pham et al., ICLR 2024, "Circumventing Concept Erasure Methods"): textual
inversion of a new token against a model's frozen UNet and text encoder(s). It attacks an erasure in
eval, and an adversarial erasure can train against it; `denoising_loss` is the loss both attacks lower.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from erase.conditioning import Conditioning
from erase.families import denoiser, predict
from erase.objectives import draw_timesteps, mse_per_sample, noisy_latents_and_target, step_generator, training_scheduler
from erase.tokens import PlaceholderTokens, allowed_token_ids

__all__ = ["INVERSION_TOKEN", "InversionSettings", "conditioned_loss", "denoising_loss", "inversion_captions", "inversion_tokens",
           "loss_scaler", "starting_vectors", "train_inversion", "train_text_free"]

INVERSION_TOKEN = "<erased-concept>"


def inversion_tokens(n: int = 1) -> list[str]:
    """The placeholder words of an n-vector inversion, written one after another where the concept's
    name was: INVERSION_TOKEN for one vector (Pham et al.'s setting), else <erased-concept-0> ...."""
    if n < 1:
        raise ValueError(f"inversion-vectors must be >= 1, got {n}")
    return [INVERSION_TOKEN] if n == 1 else [f"<erased-concept-{i}>" for i in range(n)]


@dataclass
class InversionSettings:
    """How the token is learnt (see eval.attack.AttackOptions for the command's spelling and defaults)."""

    steps: int = 1000  # optimizer steps
    lr: float = 5e-3  # as used: not scaled by the batch
    batch_size: int = 4  # target images per micro-batch
    accumulation: int = 1  # micro-batches per optimizer step
    weight_decay: float = 0.0  # AdamW's; 0: Adam
    init: str | None = None  # a word whose embedding starts the token (None: the mean embedding)
    flip: bool = False  # mirror each drawn target image with probability 1/2
    vectors: int = 1  # new token vectors learned together (1: Pham et al.'s setting)
    seed: int = 0

    @property
    def tokens(self) -> list[str]:
        return inversion_tokens(self.vectors)

    @property
    def phrase(self) -> str:
        """What stands for the concept in a caption: the placeholder words, space-separated."""
        return " ".join(self.tokens)


def denoising_loss(pipe, scheduler, latents: torch.Tensor, timesteps: torch.Tensor, prompts: Sequence[str],
                    g: torch.Generator) -> torch.Tensor:
    """The mean ||target - UNet(x_t, t | prompt)||^2 of `latents` (B, 4, h, w) at `timesteps` (B,), with
    fresh noise from `g`, noised by the `training_scheduler` `scheduler`; gradients reach the placeholder
    vectors through the text encoder(s). SDXL's size ids are those of the latents' images."""
    from erase.sd import text_conditioning

    return conditioned_loss(pipe, scheduler, latents, timesteps,
                            lambda: text_conditioning(pipe, prompts, resolution=latents.shape[-1] * pipe.vae_scale_factor), g)


def conditioned_loss(pipe, scheduler, latents: torch.Tensor, timesteps: torch.Tensor, conditioning, g: torch.Generator) -> torch.Tensor:
    """`denoising_loss` under a conditioning given directly (`conditioning()` builds it, after the noise
    is drawn): what the text-free inversion optimises."""
    noise = torch.randn(latents.shape, generator=g, device=g.device).to(latents.device, latents.dtype)
    x_t, target = noisy_latents_and_target(scheduler, latents, noise, timesteps)
    cond = conditioning()
    model = denoiser(pipe)
    pred = predict(model, x_t.to(model.dtype), timesteps, cond.to(dtype=model.dtype))
    return mse_per_sample(pred, target).mean()


def train_text_free(pipe, latents: torch.Tensor, start: Conditioning, opts: InversionSettings) -> tuple[Conditioning, list[float]]:
    """The text-free inversion: the conditioning itself (the text encoders' output sequence, and the
    pooled embedding where the family has one) learned from `start` (one row) to minimise the
    denoising loss of `latents` at uniform random timesteps, with no token and no text encoder in the
    loop: an attack in the space every token inversion maps into (TINA's setting). Returns the learned
    conditioning (one row) and the loss per 50 steps."""
    g = step_generator(opts.seed, 0, device=latents.device)
    scheduler = training_scheduler(pipe.scheduler)
    hidden = start.hidden_states.detach().float().clone().requires_grad_(True)
    pooled = None if start.text_embeds is None else start.text_embeds.detach().float().clone().requires_grad_(True)

    def rows(n: int) -> Conditioning:
        return Conditioning(hidden, pooled, start.time_ids).expand(n)

    def micro_batch_loss() -> torch.Tensor:
        pick = torch.randint(0, len(latents), (opts.batch_size,), generator=g, device=g.device).tolist()
        t = draw_timesteps(scheduler, len(pick), g, latents.shape).to(latents.device)
        return conditioned_loss(pipe, scheduler, latents[pick], t, lambda: rows(len(pick)), g)

    trace = _optimise(pipe, [t for t in (hidden, pooled) if t is not None], opts, micro_batch_loss)
    return Conditioning(hidden.detach(), None if pooled is None else pooled.detach(), start.time_ids), trace


def _optimise(pipe, params: list[torch.Tensor], opts: InversionSettings, micro_batch_loss) -> list[float]:
    """`opts.steps` steps of Adam (AdamW with `opts.weight_decay`) on `params`, each over `opts.accumulation`
    micro-batches of `micro_batch_loss()`, the loss scaled under fp16; returns the mean loss per 50 steps."""
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay) if opts.weight_decay \
        else torch.optim.Adam(params, lr=opts.lr)
    scaler = loss_scaler(pipe)
    trace, running = [], []
    for step in range(opts.steps):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(opts.accumulation):
            loss = micro_batch_loss() / opts.accumulation
            scaler.scale(loss).backward()
            total = total + loss.detach()
        scaler.step(optimizer)
        scaler.update()
        running.append(total)
        if len(running) == 50 or step == opts.steps - 1:
            trace.append(float(torch.stack(running).mean()))
            running = []
    return trace


def loss_scaler(pipe) -> torch.amp.GradScaler:
    """An attack's GradScaler: a gradient that reaches the vectors through an fp16 UNet and text encoder
    underflows as the training's does, so under fp16 the loss is scaled (dynamically, skipping steps that
    overflow) as the training's GradScaler scales it; under fp32 and bf16 a no-op."""
    model = denoiser(pipe)
    return torch.amp.GradScaler(model.device.type, enabled=model.dtype == torch.float16)


def inversion_captions(prompts: Sequence[str], concept_name: str | None, token: str = INVERSION_TOKEN) -> list[str]:
    """Each prompt with the concept's name (a whole word) replaced by the token, else the token prepended."""
    out = []
    for p in prompts:
        pattern = re.compile(rf"\b{re.escape(concept_name)}\b", re.IGNORECASE) if concept_name else None
        out.append(pattern.sub(token, p) if pattern and pattern.search(p) else f"{token} {p}")
    return out


def starting_vectors(place: PlaceholderTokens, n: int, init: str | None = None) -> list[torch.Tensor]:
    """Where n learned vectors start, per text encoder of an entered `place` ((n, D) fp32 each): the
    embedding of the word `init` (its tokens' mean), else the mean embedding of the vocabulary."""
    starts = []
    for (tokenizer, _), m in zip(place.pairs, place.embedding_matrices(), strict=True):
        ids = tokenizer(init, add_special_tokens=False).input_ids if init else allowed_token_ids(tokenizer, m.shape[0])
        starts.append(m.detach()[torch.as_tensor(ids, device=m.device)].float().mean(0, keepdim=True).repeat(n, 1))
    return starts


def train_inversion(pipe, latents: torch.Tensor, captions: Sequence[str], opts: InversionSettings,
                    mirrored: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[float]]:
    """Textual inversion against `pipe`'s frozen UNet and text encoder(s): `opts.vectors` embeddings per
    text encoder, one for each of `opts.tokens`, learned together to minimise the denoising loss of
    `latents` (N, 4, h, w) under `captions` (which hold `opts.phrase`) at uniform random timesteps. Every
    vector starts at the initializer word's embedding (or the mean embedding); their positions in the
    prompt tell them apart. With `opts.flip`, `mirrored` holds the latents of the mirrored images and
    each drawn image is mirrored with probability 1/2. Returns the embeddings ((vectors, D) per text
    encoder) and the loss per 50 steps."""
    g = step_generator(opts.seed, 0, device=latents.device)
    scheduler = training_scheduler(pipe.scheduler)
    if opts.flip and mirrored is None:
        raise ValueError("flip needs the mirrored images' latents")
    with PlaceholderTokens(pipe, opts.tokens) as place:
        matrices = place.embedding_matrices()
        vectors = [v.requires_grad_(True) for v in starting_vectors(place, opts.vectors, opts.init)]

        def micro_batch_loss() -> torch.Tensor:
            pick = torch.randint(0, len(latents), (opts.batch_size,), generator=g, device=g.device).tolist()
            t = draw_timesteps(scheduler, len(pick), g, latents.shape).to(latents.device)
            batch = latents[pick]
            if opts.flip:
                flip = torch.rand(len(pick), generator=g, device=g.device).to(latents.device) < 0.5
                batch = torch.where(flip[:, None, None, None], mirrored[pick], batch)
            place.set([v.to(m.dtype) for v, m in zip(vectors, matrices, strict=True)])
            return denoising_loss(pipe, scheduler, batch, t, [captions[i] for i in pick], g)

        trace = _optimise(pipe, vectors, opts, micro_batch_loss)
    return [v.detach() for v in vectors], trace
