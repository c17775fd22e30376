"""Stable Diffusion wrapper: load a model of a supported family, encode, and generate.

Families: `StableDiffusionPipeline` (SD 1.x and 2.x, epsilon or v-prediction),
`StableDiffusionXLPipeline` (SDXL: two text encoders, pooled embeddings, size/crop time ids),
`StableDiffusion3Pipeline` (SD3 / 3.5: an MMDiT transformer, CLIP-L + CLIP-G + optional T5) and
`FluxPipeline` (FLUX.1: CLIP-L pooled + T5, packed latents); erase/families.py holds what differs.
The same code serves the embedded digits model, a local folder and a hub id such as
CompVis/stable-diffusion-v1-4 or stabilityai/stable-diffusion-xl-base-1.0. Device and dtype
always come from the caller.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import diffusers
import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from erase.command import check_model
from erase.conditioning import Conditioning
from erase.defaults import DIGITS_MODEL_NAME, SD_GUIDANCE, SD_KIND, SD_STEPS
from erase.digits.locate import resolve_model  # `digits` -> its folder; anything else unchanged
from erase.families import denoiser_name, family

logger = logging.getLogger(__name__)
_DIFFUSERS_VERSION = tuple(int(x) for x in diffusers.__version__.split(".")[:2])

# The UNet of CompVis/stable-diffusion-v1-4 (unet/config.json): 860M weights. Benchmarks build
# it with random weights, so nothing is downloaded.
SD_V1_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)

__all__ = ["FAMILIES", "encode_images", "encode_prompts", "generate", "check_prompts_fit", "is_sdxl", "load_pipeline",
           "max_sequence_length",
           "denoiser_source", "embeds_kwargs", "pipeline_class", "resolve_model", "sampler_defaults", "text_conditioning"]



def sampler_defaults(name_or_path: str) -> tuple[int, float]:
    """(sampler steps, guidance scale) for a model: the embedded model's for it and for models
    erased from it, Stable Diffusion's otherwise. The one table every command reads."""
    from erase.digits import DEFAULT_GUIDANCE, DEFAULT_STEPS, is_digits_model

    if is_digits_model(name_or_path):
        return DEFAULT_STEPS, DEFAULT_GUIDANCE
    return FLOW_SAMPLERS.get(_class_name(name_or_path), (SD_STEPS, SD_GUIDANCE))


# The flow families' pipeline defaults (their __call__'s): SD3 28 steps at guidance 7; Flux 28 at its
# distilled guidance 3.5 (FLUX.1-schnell users pass 4 steps).
FLOW_SAMPLERS = {"StableDiffusion3Pipeline": (28, 7.0), "FluxPipeline": (28, 3.5)}


def _index(name_or_path: str) -> dict:
    """model_index.json of a folder or hub id (empty where it cannot be read)."""
    try:
        return dict(DiffusionPipeline.load_config(resolve_model(name_or_path)))
    except (OSError, ValueError):
        return {}


def _class_name(name_or_path: str) -> str | None:
    return _index(name_or_path).get("_class_name")


def _absent(index: dict, component: str) -> bool:
    """A component the pipeline was saved without (model_index.json names it as null)."""
    return index.get(component) in (None, [None, None])


# The T5 window each flow pipeline encodes prompts into by default (its __call__'s max_sequence_length).
T5_WINDOWS = {"StableDiffusion3Pipeline": 256, "FluxPipeline": 512}


def t5_window(class_name: str, tokenizer) -> int:
    """The pipeline's default window, or the T5 tokenizer's own where that is shorter."""
    return min(T5_WINDOWS[class_name], tokenizer.model_max_length) if tokenizer is not None else T5_WINDOWS[class_name]


def model_kind(name_or_path: str) -> str:
    """`digits` for the embedded model and models erased from it, `stable-diffusion` otherwise: what
    a concept file's `model:` names (erase.concepts.concept_file_model)."""
    from erase.digits import is_digits_model

    return DIGITS_MODEL_NAME if is_digits_model(name_or_path) else SD_KIND


# The pipeline classes this toolkit erases from, by model_index.json's `_class_name`.
FAMILIES = {"StableDiffusionPipeline": StableDiffusionPipeline, "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
            "StableDiffusion3Pipeline": StableDiffusion3Pipeline, "FluxPipeline": FluxPipeline}


def pipeline_class(name_or_path: str) -> type[DiffusionPipeline]:
    """The supported pipeline class of a folder or hub id (from its model_index.json, nothing else
    loaded); one clear error for anything else."""
    check_model(name_or_path)
    path = resolve_model(name_or_path)
    try:
        name = DiffusionPipeline.load_config(path).get("_class_name")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load model {name_or_path!r} (offline, or not a diffusers pipeline?): {err}".splitlines()[0]) from err
    if name not in FAMILIES:
        raise ValueError(f"{name_or_path} is a {name}; supported: StableDiffusionPipeline (SD 1.x, 2.x), "
                         "StableDiffusionXLPipeline (SDXL), StableDiffusion3Pipeline (SD3, 3.5), FluxPipeline (FLUX.1)")
    return FAMILIES[name]


# What each flow family cannot run without (model_index.json's components); T5 is optional in SD3 only.
REQUIRED_COMPONENTS = {"StableDiffusion3Pipeline": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
                       "FluxPipeline": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}


def check_prompts_fit(name_or_path: str, prompts: Sequence[str]) -> None:
    """A flow model's folder has the encoders its family needs, and every prompt fits its T5 window
    (diffusers would cut a longer one silently); from model_index.json and the T5 tokenizer alone."""
    index = _index(name_or_path)
    name = index.get("_class_name")
    if name not in REQUIRED_COMPONENTS:
        return
    path = Path(resolve_model(name_or_path))
    missing = [c for c in REQUIRED_COMPONENTS[name] if _absent(index, c) or not (path / c).is_dir()]
    if missing:
        raise ValueError(f"{name_or_path} is a {name} without {', '.join(missing)}: every method encodes prompts with them")
    t5 = "tokenizer_2" if name == "FluxPipeline" else "tokenizer_3"
    if _absent(index, t5):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path / t5)
    window = t5_window(name, tokenizer)
    for prompt in prompts:
        n = len(tokenizer(prompt).input_ids)
        if n > window:
            raise ValueError(f"prompt {prompt[:60]!r} is {n} T5 tokens; {name_or_path}'s T5 window is {window} "
                             "(the pipeline would cut it): shorten it")


def is_sdxl(pipe) -> bool:
    return isinstance(pipe, StableDiffusionXLPipeline)


def load_pipeline(name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  components: Mapping[str, torch.nn.Module] = {}) -> DiffusionPipeline:
    """Load a pipeline folder or hub id of a supported family, without a safety checker; one clear
    error if it is missing or of another kind. `components`: models built already (a sharded UNet),
    used as they are and left where they are."""
    cls = pipeline_class(name_or_path)
    path = resolve_model(name_or_path)
    # diffusers 0.42 renamed torch_dtype to dtype
    kwargs = {"dtype": dtype} if _DIFFUSERS_VERSION >= (0, 42) else {"torch_dtype": dtype}
    kwargs |= components
    if cls is StableDiffusionPipeline:
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    if cls is StableDiffusion3Pipeline and _absent(_index(path), "text_encoder_3"):  # T5 is optional in SD3; diffusers needs telling
        kwargs |= {"text_encoder_3": None, "tokenizer_3": None}
    try:
        pipe = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load model {name_or_path!r}: {err}".splitlines()[0]) from err
    pipe.set_progress_bar_config(disable=True)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module) and name not in components:
            module.to(device)
    return pipe


def denoiser_source(name_or_path: str) -> tuple[type[torch.nn.Module], str]:
    """The class and the local folder of a pipeline's UNet or transformer (what an erasure trains),
    from model_index.json alone."""
    index = _index(name_or_path)
    component = "unet" if "unet" in index else "transformer"
    path = resolve_model(name_or_path)
    if not os.path.isdir(path):  # a hub id: its cached snapshot (the one from_pretrained loads)
        path = DiffusionPipeline.download(path)
    library, class_name = index[component]
    return getattr(importlib.import_module(library), class_name), os.path.join(path, component)


def max_sequence_length(pipe) -> int | None:
    """The T5 window a flow pipeline encodes prompts into: the pipeline's default (SD3 256, Flux 512),
    or the T5 tokenizer's own window where that is shorter. None for the UNet families."""
    if family(pipe) == "flux":
        return t5_window(type(pipe).__name__, pipe.tokenizer_2)
    if family(pipe) == "sd3":
        if pipe.tokenizer_3 is None:  # T5's zeros: as many as the CLIP window (77 as SD3's own inference pads T5)
            return min(T5_WINDOWS["StableDiffusion3Pipeline"], pipe.tokenizer_max_length)
        return t5_window(type(pipe).__name__, pipe.tokenizer_3)
    return None

@torch.no_grad()
def generate(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 16,
    height: int | None = None,
    width: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    conditioning: Conditioning | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair; image i depends only on prompts[i] and seeds[i],
    not on batching, so results are reproducible across batch sizes and processes.
    With `autocast_dtype` the pipeline runs under autocast on its device (an fp32 UNet beside a
    bf16 text encoder and VAE, as during training). `conditioning` (one row): every image under it
    instead of its prompt's encoding (the text-free inversion's), the empty prompt unconditional."""
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        chunk_prompts, chunk_seeds = list(prompts[i : i + batch_size]), seeds[i : i + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in chunk_seeds]  # diffusers moves the noise
        window = max_sequence_length(pipe)
        text = {"prompt": chunk_prompts} if conditioning is None else embeds_kwargs(pipe, conditioning.expand(len(chunk_prompts)))
        with torch.autocast(pipe.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None), _vae_decodes_in_its_dtype(pipe):
            out = pipe(
                **text,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                height=height,
                width=width,
                **({"max_sequence_length": window} if window else {}),
            )
        images.extend(out.images)
    return images


def embeds_kwargs(pipe, cond: Conditioning) -> dict:
    """A pipeline call's text arguments for a conditioning given directly: its hidden states and pooled
    embedding, and the empty prompt's as the unconditional input (Flux's distilled guidance has none)."""
    dtype = getattr(pipe, denoiser_name(pipe)).dtype
    kwargs = {"prompt_embeds": cond.hidden_states.to(dtype)}
    if cond.text_embeds is not None:  # SDXL, SD3, Flux
        kwargs["pooled_prompt_embeds"] = cond.text_embeds.to(dtype)
    if family(pipe) == "flux":
        return kwargs
    empty = encode_prompts(pipe, [""]).expand(len(cond))
    kwargs["negative_prompt_embeds"] = empty.hidden_states.to(dtype)
    if cond.text_embeds is not None:
        kwargs["negative_pooled_prompt_embeds"] = empty.text_embeds.to(dtype)
    return kwargs


@contextlib.contextmanager
def _vae_decodes_in_its_dtype(pipe):
    """Under autocast an fp32 VAE would decode in the autocast dtype, and the pipeline's own upcast,
    which looks at the VAE's weights, would not fire: SDXL's VAE overflows in fp16 (NaN or black
    images). Decode in the VAE's own dtype, outside autocast, while this is open."""
    vae = pipe.vae
    if not torch.is_autocast_enabled(pipe.device.type) or vae.dtype != torch.float32:
        yield
        return
    decode = vae.decode

    def decode_in_fp32(z, *args, **kwargs):
        with torch.autocast(pipe.device.type, enabled=False):
            return decode(z.to(vae.dtype), *args, **kwargs)

    vae.decode = decode_in_fp32
    try:
        yield
    finally:
        del vae.decode  # the class's own method again


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], batch_size: int = 64, resolution: int | None = None) -> Conditioning:
    """What the UNet is conditioned on for each prompt: the text encoder's hidden states (N, 77, D);
    for SDXL also the pooled embedding and the time ids of a `resolution`-square image (default:
    the model's), with the empty prompt zeroed where the pipeline does so for guidance."""
    return text_conditioning(pipe, prompts, batch_size, resolution)


def text_conditioning(pipe, prompts: Sequence[str], batch_size: int = 64, resolution: int | None = None) -> Conditioning:
    """`encode_prompts` with autograd on: gradients reach whatever feeds the text encoders' token
    embeddings (the attacks of eval/attack.py optimise those)."""
    if is_sdxl(pipe):
        return _encode_sdxl(pipe, prompts, batch_size, resolution)
    if family(pipe) in ("sd3", "flux"):
        return _encode_flow(pipe, prompts, batch_size)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = pipe.tokenizer(
            list(prompts[i : i + batch_size]),
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(pipe.text_encoder.device)
        out.append(pipe.text_encoder(ids)[0])
    return Conditioning(torch.cat(out))


def _encode_sdxl(pipe, prompts: Sequence[str], batch_size: int, resolution: int | None) -> Conditioning:
    hidden, pooled = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        h, _, p, _ = pipe.encode_prompt(chunk, device=pipe.text_encoder_2.device, num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)
        if pipe.config.force_zeros_for_empty_prompt:  # the pipeline's unconditional input is zeros
            empty = torch.tensor([not c.strip() for c in chunk], device=h.device)
            h, p = h.masked_fill(empty[:, None, None], 0), p.masked_fill(empty[:, None], 0)
        hidden.append(h)
        pooled.append(p)
    size = resolution or pipe.default_sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=hidden[0].dtype, device=hidden[0].device)
    return Conditioning(torch.cat(hidden), torch.cat(pooled), time_ids.expand(len(prompts), -1))


def _encode_flow(pipe, prompts: Sequence[str], batch_size: int) -> Conditioning:
    """SD3: CLIP-L and CLIP-G hidden states side by side, zero-padded to T5's width, then T5's (zeros
    without T5), with both CLIPs' pooled embeddings; Flux: T5's hidden states and CLIP-L's pooled
    embedding. Each pipeline's own `encode_prompt`, with its T5 window."""
    hidden, pooled = [], []
    window = max_sequence_length(pipe)
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        if family(pipe) == "sd3":
            h, _, p, _ = pipe.encode_prompt(chunk, None, None, device=pipe.text_encoder.device, do_classifier_free_guidance=False,
                                            max_sequence_length=window)
        else:
            h, p, _ = pipe.encode_prompt(chunk, None, device=pipe.text_encoder.device, max_sequence_length=window)
        hidden.append(h)
        pooled.append(p)
    return Conditioning(torch.cat(hidden), torch.cat(pooled))


@torch.no_grad()
def encode_images(pipe, images: Sequence[Image.Image], batch_size: int | None = None) -> torch.Tensor:
    """VAE latents (N, C, h, w) as the denoiser sees them (the posterior mean: deterministic): scaled by
    the VAE's scaling factor, after subtracting its shift factor where it has one (SD3, Flux). Default
    batch: 32 images up to 512 x 512 pixels, fewer of larger ones (8 at 1024 px: the encoder's
    activations grow with the pixels, ~26 GB for 32 SDXL images in bf16)."""
    if batch_size is None:
        batch_size = max(1, min(32, 32 * 512 * 512 // (images[0].width * images[0].height))) if images else 1
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for i in range(0, len(images), batch_size):
        pixels = pipe.image_processor.preprocess(list(images[i : i + batch_size])).to(vae.device, vae.dtype)
        out.append((vae.encode(pixels).latent_dist.mean - shift) * vae.config.scaling_factor)
    return torch.cat(out)
