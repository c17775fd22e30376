"""Prompt-wise search on a Stable Diffusion UNet: the candidates' images, the SalUn/ESD lower
level (erase.objectives' targets, per sample) and the denoising upper loss."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from erase.command import quiet_libraries
from erase.conditioning import Conditioning
from erase.families import denoiser, predict
from erase.objectives import (
    anchor_target,
    esd_target,
    guided_prediction,
    mse_per_sample,
    noised,
)
from erase.saliency import compute_saliency_mask
from erase.worst_case.config import PROMPT_LOSSES, WorstCaseConfig, random_start, report
from erase.worst_case.solver import (
    LowerOptions,
    accumulate,
    resolve_size,
    search,
    unlearning_steps,
)


def digits_candidates() -> tuple[list[str], list[str]]:
    """The 40 template prompts of the embedded model and their anchors (the next digit, same
    colour, as in prompts/digits.yaml)."""
    from erase.digits import COLOURS, prompt_for

    prompts = [prompt_for(d, c) for d in range(10) for c in COLOURS]
    anchors = [prompt_for((d + 1) % 10, c) for d in range(10) for c in COLOURS]
    return prompts, anchors


@dataclass
class PromptData:
    """Encoded candidate prompts and the original model's images of each (erase.image_sets.image_set)."""

    latents: torch.Tensor  # (N, 4, h, w)
    prompt_of: torch.Tensor  # (N,) candidate index of each image
    embeds: Conditioning  # P rows: c
    anchor_embeds: Conditioning  # P rows: c'
    uncond_embeds: Conditioning  # 1 row: the empty prompt


class PromptProblem:
    """Prompt-wise search on a Stable Diffusion UNet: items are the candidate prompts.

    Lower level (per image j of prompt p(j), the same x_t for both terms): SalUn / RL
    (SalUn Eq. 9 split per sample) w_p ||eps(x_t, c) - sg eps(x_t, c')||^2 + beta (1 - w_p)
    ||eps(x_t, c) - eps||^2, SalUn under a mask from the w-weighted Eq. 8 loss; ESD (Gandikota
    et al. 2023, Eq. 2) w_p ||eps(x_t, c) - sg[eps*(x_t) - eta (eps*(x_t, c) - eps*(x_t))]||^2 on
    its parameter subset. Upper level: each prompt's denoising loss on its own images after
    unlearning, at fixed (t, noise) draws (common random numbers across upper steps).
    """

    def __init__(self, unet: nn.Module, scheduler, data: PromptData, lower: LowerOptions, beta: float = 0.5,
                 eta: float = 1.0, guidance_scale: float = 7.5, eval_draws: int = 2, upper_loss: str = "denoising",
                 device: str | torch.device | None = None):
        from erase.objectives import ESD_TARGETS
        from erase.saliency import select_parameters

        self.unet, self.scheduler, self.data, self.opts = unet, scheduler, data, lower
        if upper_loss not in PROMPT_LOSSES:
            raise ValueError(f"unknown prompt upper loss {upper_loss!r}; choose from {', '.join(PROMPT_LOSSES)}")
        device = device if device is not None else next(unet.parameters()).device  # default: where the UNet is
        self.beta, self.eta, self.guidance_scale, self.device, self.upper_loss = beta, eta, guidance_scale, device, upper_loss
        self.num_items = len(data.embeds)
        self.counts = torch.bincount(data.prompt_of, minlength=self.num_items).double()
        if (self.counts == 0).any():
            raise ValueError("every candidate prompt needs at least one image")
        pattern = ESD_TARGETS.get(lower.method)
        self.param_names = {n for n, _ in select_parameters(unet, pattern)}
        self.frozen = copy.deepcopy(unet).to(device).requires_grad_(False).eval() if lower.method.startswith("esd") else None
        self.eval_draws = eval_draws
        self.eval_batches = self._draws(eval_draws, lower.seed + 1)

    def _noised(self, idx: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        batch = noised(self.scheduler, self.data.latents[idx.to(self.data.latents.device)], g)
        batch["idx"] = idx
        return {k: v.to(self.device) for k, v in batch.items()}

    def _draws(self, draws: int, seed: int) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        n, size = len(self.data.latents), max(1, self.opts.batch_size)
        return [self._noised(torch.arange(n)[i : i + size], g) for _ in range(draws) for i in range(0, n, size)]

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for n, p in model.named_parameters() if n in self.param_names and p.requires_grad]

    def _cond(self, batch, table: torch.Tensor) -> torch.Tensor:
        return table[self.data.prompt_of[batch["idx"].cpu()].to(table.device)].to(self.device)

    def _terms(self, unet: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(retain_j, forget_j, prediction) per image of the batch; the prediction carries the graph."""
        x, t = batch["noisy_latents"], batch["timesteps"]
        cond = self._cond(batch, self.data.embeds)
        model_pred = predict(unet, x, t, cond)
        if self.frozen is not None:
            uncond = self.data.uncond_embeds.to(self.device).expand(len(x), -1, -1)
            target = esd_target(self.frozen, x, t, cond, uncond, self.eta)
        else:
            target = anchor_target(unet, x, t, self._cond(batch, self.data.anchor_embeds))
        forget = mse_per_sample(model_pred, target)
        if self.frozen is not None:
            return torch.zeros_like(forget), forget, model_pred
        return self.beta * mse_per_sample(model_pred, batch["target"]), forget, model_pred

    def _mask(self, unet: nn.Module, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """SalUn Eq. 8 with per-prompt weights: |grad sum_j w_p(j) MSE(eps_cfg, eps)|, top ratio."""

        def loss_fn(m, batch):
            x, t = batch["noisy_latents"], batch["timesteps"]
            uncond = self.data.uncond_embeds.to(self.device).expand(len(x), -1, -1)
            eps_cfg = guided_prediction(m, x, t, self._cond(batch, self.data.embeds), uncond, self.guidance_scale)
            sw = w[self.data.prompt_of[batch["idx"].cpu()]].to(eps_cfg)
            return -(sw * mse_per_sample(eps_cfg, batch["noise"])).sum()

        return compute_saliency_mask(unet, loss_fn, self.eval_batches, self.opts.mask_ratio, show_progress=False)

    def lower(self, w: torch.Tensor) -> nn.Module:
        opts = self.opts
        unet = copy.deepcopy(self.unet).to(self.device)
        for n, p in unet.named_parameters():
            p.requires_grad_(n in self.param_names)
        mask = self._mask(unet, w) if opts.method == "salun" else None
        if mask is not None:
            mask = {n: m for n, m in mask.items() if n in self.param_names}
        pw = w.float()

        def terms(g: torch.Generator):
            batch = self._noised(torch.randint(0, len(self.data.latents), (opts.batch_size,), generator=g), g)
            retain, forget, _ = self._terms(unet, batch)
            return retain, forget, pw[self.data.prompt_of[batch["idx"].cpu()]].to(forget)

        return unlearning_steps(unet, self.trainable(unet), mask, opts, terms)

    def _per_image(self, unet: nn.Module, fn) -> torch.Tensor:
        """Mean over the eval draws of fn(batch) per image, (N,)."""
        total = torch.zeros(len(self.data.latents), dtype=torch.float64)
        for batch in self.eval_batches:
            total.index_add_(0, batch["idx"].cpu(), fn(batch).detach().double().cpu())
        return total / self.eval_draws

    def _by_prompt(self, per_image: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.num_items, dtype=torch.float64).index_add_(0, self.data.prompt_of, per_image)

    def _denoising(self, unet: nn.Module, batch) -> torch.Tensor:
        """The upper-level forget loss per image (see `upper_loss`)."""
        x, t = batch["noisy_latents"], batch["timesteps"]
        pred = predict(unet, x, t, self._cond(batch, self.data.embeds))
        loss = mse_per_sample(pred, batch["target"])
        if self.upper_loss == "contrast":  # minus the same loss under the anchor (ESD: the empty prompt)
            if self.frozen is not None:
                reference = self.data.uncond_embeds.to(self.device).expand(len(x), -1, -1)
            else:
                reference = self._cond(batch, self.data.anchor_embeds)
            loss = loss - mse_per_sample(predict(unet, x, t, reference), batch["target"])
        return loss

    @torch.no_grad()
    def item_losses(self, unet: nn.Module) -> torch.Tensor:
        unet.eval()
        return self._by_prompt(self._per_image(unet, lambda b: self._denoising(unet, b))) / self.counts

    def upper_gradient(self, unet: nn.Module, w: torch.Tensor) -> list[torch.Tensor]:
        unet.eval()
        params = self.trainable(unet)
        total = [torch.zeros_like(p) for p in params]
        per_image_w = (w / self.counts)[self.data.prompt_of].float() / self.eval_draws  # as in item_losses
        for batch in self.eval_batches:
            loss = (per_image_w[batch["idx"].cpu()].to(self.device) * self._denoising(unet, batch)).sum()
            accumulate(total, torch.autograd.grad(loss, params, allow_unused=True))
        return total

    @torch.no_grad()
    def lower_partials(self, unet: nn.Module) -> torch.Tensor:
        unet.eval()

        def diff(batch):
            retain, forget, _ = self._terms(unet, batch)
            return forget - retain

        return self._by_prompt(self._per_image(unet, diff)) / len(self.data.latents)


def prepare_prompt_data(pipe, prompts: Sequence[str], anchors: Sequence[str], images_per_prompt: int,
                        generation_steps: int, guidance_scale: float, cache_dir: str, resolution: int | None = None) -> PromptData:
    """Generate (or reuse from the cache) `images_per_prompt` images per candidate and encode everything."""
    from erase.image_sets import image_set
    from erase.sd import encode_images, encode_prompts

    images, chosen = image_set(pipe, list(prompts), images_per_prompt * len(prompts), 0, generation_steps,
                               guidance_scale, os.path.join(cache_dir, "images"), resolution)
    index = {p: i for i, p in enumerate(prompts)}
    return PromptData(
        latents=encode_images(pipe, images),
        prompt_of=torch.tensor([index[p] for p in chosen]),
        embeds=encode_prompts(pipe, list(prompts)),
        anchor_embeds=encode_prompts(pipe, list(anchors)),
        uncond_embeds=encode_prompts(pipe, [""]),
    )


def load_candidates(path: str | None) -> tuple[list[str], list[str]]:
    """[prompt, anchor] pairs (or bare prompts, anchored to the empty prompt) from a JSON file."""
    if path is None:
        return digits_candidates()
    try:
        with open(path) as f:
            items = json.load(f)
        pairs = [(it, "") if isinstance(it, str) else (str(it[0]), str(it[1])) for it in items]
    except (OSError, ValueError, TypeError, IndexError, KeyError) as err:
        raise ValueError(f"cannot read candidate prompts from {path}: expected a JSON list of [prompt, anchor] pairs ({err})") from err
    if len(pairs) < 2 or len({p for p, _ in pairs}) != len(pairs):
        raise ValueError(f"{path} must list at least two distinct candidate prompts")
    return [p for p, _ in pairs], [a for _, a in pairs]


def build_prompt_problem(cfg: WorstCaseConfig, pipe, prompts: Sequence[str], anchors: Sequence[str],
                         device: str | torch.device | None = None) -> PromptProblem:
    """The prompt-wise problem on `pipe`'s UNet, on `device` (default: the pipeline's)."""
    from erase.families import frozen_parts
    from erase.objectives import training_scheduler
    from erase.sd import sampler_defaults

    steps, guidance = sampler_defaults(cfg.model)
    data = prepare_prompt_data(pipe, prompts, anchors, cfg.images_per_prompt, cfg.generation_steps or steps,
                               cfg.guidance_scale if cfg.guidance_scale is not None else guidance, cfg.cache_dir)
    scheduler = training_scheduler(pipe.scheduler)
    pipe.vae.requires_grad_(False)
    for name in frozen_parts(pipe):
        getattr(pipe, name).requires_grad_(False)
    return PromptProblem(denoiser(pipe), scheduler, data, cfg.lower_options(), beta=cfg.beta, eval_draws=cfg.eval_draws,
                         upper_loss=cfg.prompt_loss, device=device)


def run_prompt(cfg: WorstCaseConfig, device: str | torch.device = "cpu", show_progress: bool = True) -> dict:
    """Prompt-wise search on a Stable Diffusion pipeline."""
    prompts, anchors = load_candidates(cfg.prompts)
    m = resolve_size(cfg.size, len(prompts))  # fail before loading anything
    quiet_libraries()
    from erase.sd import load_pipeline

    pipe = load_pipeline(cfg.model, device=device)
    start = time.perf_counter()
    problem = build_prompt_problem(cfg, pipe, prompts, anchors, device)
    seconds_data = time.perf_counter() - start
    result = search(problem, m, cfg.search_options(show_progress), random_start(len(prompts), m, cfg.seed))
    return report(cfg, result, m, len(prompts), prompts=[prompts[i] for i in result.selected],
                   start_prompts=[prompts[i] for i in result.start], anchors=[anchors[i] for i in result.selected],
                   seconds_data=seconds_data)
