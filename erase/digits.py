"""The embedded text-to-image model: a small Stable Diffusion pipeline trained on sklearn digits.

No model hub is reachable where this toolkit is developed and tested, so it ships its own
text-to-image model in the ordinary diffusers format. scikit-learn's 8x8 digits are
bilinear-upscaled to 32x32 and drawn in colour on a black background; prompts follow
`PROMPT_TEMPLATE` ("a red handwritten digit seven"), plus paraphrases ("digit 7",
"the number 7 in red", ...) so that an erasure can be tested against wordings it was not
trained to forget. Concepts: ten digits (objects) and `COLOURS` (styles).

Data split (fixed, by the index ``i`` of ``sklearn.datasets.load_digits()``, never shuffled):

* ``i % 10 in 0..4`` -> "generator":  the VAE and UNet train on these (900 images);
* ``i % 10 in 5..8`` -> "classifier": the judging classifier trains on these (718 images);
* ``i % 10 == 9``    -> "test":       held out from both, to measure the classifier (179).

The classifier never sees an image the generator was trained on, so it judges what the
generator learned rather than what it memorised.

``python -m erase.digits --train --output-dir DIR`` rebuilds the pipeline from scratch;
``--train-classifier --classifier-out FILE`` rebuilds the classifier. Weights, data order,
noise and prompt choice all come from the seed, so a rebuild is bit-identical for the same
seed, library versions and torch thread count; CPU kernels split their sums by thread, so a
different thread count gives a model that differs in its weights but not in its quality.
The thread count is recorded in ``digits_training.json``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from erase.atomic import replace_path

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIER_PATH",
    "COLOURS",
    "COLOUR_PARAPHRASES",
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "DIGIT_PARAPHRASES",
    "DIGIT_WORDS",
    "FULL_PARAPHRASES",
    "MODEL_DIR",
    "PROMPT_TEMPLATE",
    "RESOLUTION",
    "ClassifierTrainingOptions",
    "DigitsClassifier",
    "DigitsTrainingOptions",
    "build_tokenizer",
    "classify_images",
    "coloured_split",
    "is_digits_model",
    "load_digits_classifier",
    "load_split",
    "paraphrases_for",
    "prompt_for",
    "render_digits",
    "resolve_model",
    "train_classifier",
    "train_pipeline",
    "training_prompts",
    "unknown_tokens",
    "vocabulary_words",
]

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLOURS = ["red", "green", "blue", "white"]
COLOUR_RGB = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0)}

PROMPT_TEMPLATE = "a {colour} handwritten digit {word}"
# Paraphrases naming both the digit and the colour ({numeral} is "7" for seven).
FULL_PARAPHRASES = (
    "the number {numeral} in {colour}",
    "a {colour} {word}",
    "a handwritten {word} in {colour}",
    "{colour} digit {numeral}",
)
# Paraphrases naming only one of the two: the model learns to fill in the other.
DIGIT_PARAPHRASES = ("a handwritten {word}", "digit {numeral}", "a {word}", "the number {word}")
COLOUR_PARAPHRASES = ("a {colour} digit", "a {colour} handwritten digit")

RESOLUTION = 32  # pixels; the VAE maps 32x32x3 to an 8x8x4 latent
DEFAULT_STEPS = 25  # DDIM steps
DEFAULT_GUIDANCE = 5.0  # classifier-free guidance scale
MODEL_NAME = "digits"

ASSET_DIR = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSET_DIR / "digits-sd"
CLASSIFIER_PATH = ASSET_DIR / "digits_classifier.safetensors"
SPLITS = {"generator": range(0, 5), "classifier": range(5, 9), "test": range(9, 10)}
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_BASE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


# ----------------------------------------------------------------------------- prompts


def prompt_for(digit: int, colour: str) -> str:
    """The canonical prompt, e.g. ``prompt_for(7, "red") == "a red handwritten digit seven"``."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose from {COLOURS}")
    return PROMPT_TEMPLATE.format(colour=colour, word=DIGIT_WORDS[digit])


def _fill(template: str, digit: int, colour: str) -> str:
    return template.format(colour=colour, word=DIGIT_WORDS[digit], numeral=str(digit))


def paraphrases_for(digit: int, colour: str, kind: str = "full") -> list[str]:
    """Trained paraphrases of `prompt_for(digit, colour)`: kind "full", "digit", "colour" or "all"."""
    templates = {
        "full": FULL_PARAPHRASES,
        "digit": DIGIT_PARAPHRASES,
        "colour": COLOUR_PARAPHRASES,
        "all": FULL_PARAPHRASES + DIGIT_PARAPHRASES + COLOUR_PARAPHRASES,
    }[kind]
    return [_fill(t, digit, colour) for t in templates]


def training_prompts() -> list[str]:
    """Every distinct prompt the UNet sees in training, the empty prompt first."""
    prompts = [""]
    for digit in range(10):
        for colour in COLOURS:
            prompts += [prompt_for(digit, colour)] + paraphrases_for(digit, colour, "all")
    return list(dict.fromkeys(prompts))


# ----------------------------------------------------------------------------- tokenizer


def vocabulary_words() -> list[str]:
    """The whole words of the vocabulary; each one encodes to exactly one token."""
    words = [w for prompt in training_prompts() for w in prompt.split()]
    return list(dict.fromkeys(words + COLOURS + DIGIT_WORDS))


def build_tokenizer():
    """A CLIPTokenizer over the project's own small byte-pair vocabulary.

    Base symbols (letters, numerals, a little punctuation, with and without the CLIP
    end-of-word marker ``</w>``) keep any lowercase text free of unknown tokens; merges are
    added until every vocabulary word is a single token.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    from transformers import CLIPTokenizer

    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS)}
    for char in _BASE_CHARS:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    # Why iterate: merging the first two pieces of every word still split, appended at the
    # lowest priority, can never change a word that is already one token, so this converges.
    for _ in range(64):
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)
        split = [tokenizer.tokenize(w) for w in vocabulary_words()]
        split = [pieces for pieces in split if len(pieces) > 1]
        if not split:
            return tuple(vocab.items()), tuple(merges)
        for pieces in split:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
    raise RuntimeError("tokenizer merges did not converge")


def unknown_tokens(tokenizer, prompt: str) -> list[str]:
    """Pieces of `prompt` that the tokenizer maps to its unknown token."""
    vocab = tokenizer.get_vocab()
    return [piece for piece in tokenizer.tokenize(prompt) if piece not in vocab or piece == tokenizer.unk_token]


# ----------------------------------------------------------------------------- data


def load_split(part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 8, 8) in [0, 1] and digit labels (N,) of one split (see the module doc)."""
    from sklearn.datasets import load_digits

    if part not in SPLITS:
        raise ValueError(f"unknown split {part!r}; choose from {list(SPLITS)}")
    data = load_digits()
    index = np.arange(len(data.target))
    keep = np.isin(index % 10, list(SPLITS[part]))
    images = torch.tensor(data.images[keep] / 16.0, dtype=torch.float32)
    return images, torch.tensor(data.target[keep], dtype=torch.long)


def render_digits(images: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) grey digits in [0, 1] and colour indices (N,) -> (N, 3, 32, 32) RGB in [0, 1]."""
    grey = F.interpolate(images[:, None], size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    rgb = torch.tensor([COLOUR_RGB[c] for c in COLOURS], dtype=images.dtype)[colours]  # (N, 3)
    return grey.clamp(0, 1) * rgb[:, :, None, None]


def coloured_split(part: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every image of a split in every colour: RGB (N*C, 3, 32, 32), digits, colour indices."""
    images, digits = load_split(part)
    n, c = len(digits), len(COLOURS)
    colours = torch.arange(c).repeat_interleave(n)
    return render_digits(images.repeat(c, 1, 1), colours), digits.repeat(c), colours


# ----------------------------------------------------------------------------- pipeline


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


def build_components(seed: int = 0) -> dict:
    """Untrained pipeline components from configs (weights seeded by `seed`)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
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
    # Why a multi-group norm in the VAE: with a single group per layer the colours washed out.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 32), norm_num_groups=4,
    )
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


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Indices of `steps` batches, walking through seeded permutations of range(n)."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def train_vae(vae, pixels: torch.Tensor, opts: DigitsTrainingOptions, generator: torch.Generator) -> None:
    """Fit the autoencoder to `pixels` (N, 3, 32, 32) in [-1, 1]: MSE + a small KL term."""
    optimizer = torch.optim.Adam(vae.parameters(), lr=opts.vae_learning_rate)
    vae.train()
    bar = tqdm(_batches(len(pixels), opts.train_batch_size, opts.vae_steps, generator), total=opts.vae_steps,
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
    mean, std = latent_stats  # (N, 4, 8, 8) each, already multiplied by the scaling factor
    _, template, para = _prompt_index_table()
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=opts.learning_rate, weight_decay=0.0)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(opts))
    unet.train()
    batches = _batches(len(mean), opts.train_batch_size, opts.max_train_steps, generator)
    bar = tqdm(batches, total=opts.max_train_steps, desc="digits UNet")
    for step, index in enumerate(bar):
        # Sample latents from the posterior, as Stable Diffusion training does.
        latents = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        prompt_ids = _choose_prompts(digits[index], colours[index], template, para, opts, generator)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=embeddings[prompt_ids]).sample
        loss = F.mse_loss(model_pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        _ema_update(ema, unet, min(opts.ema_decay, (1 + step) / (10 + step)))
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
    rgb, digits, colours = coloured_split("generator")
    if opts.limit_images is not None:
        keep = torch.randperm(len(rgb), generator=generator)[: opts.limit_images]
        rgb, digits, colours = rgb[keep], digits[keep], colours[keep]
    pixels = rgb * 2 - 1  # the VAE works in [-1, 1]
    logger.info("training the digits VAE on %d images for %d steps", len(pixels), opts.vae_steps)
    train_vae(parts["vae"], pixels, opts, generator)
    mean, std = _encode_latent_stats(parts["vae"], pixels)
    # Why: the pipeline multiplies latents by scaling_factor; unit variance suits the noise schedule.
    scaling_factor = float(1.0 / (mean.var() + std.pow(2).mean()).sqrt())
    parts["vae"].register_to_config(scaling_factor=scaling_factor)
    embeddings = _prompt_embeddings(parts["tokenizer"], parts["text_encoder"], training_prompts())
    logger.info("training the digits UNet for %d steps (batch %d)", opts.max_train_steps, opts.train_batch_size)
    parts["unet"] = train_unet(parts["unet"], parts["scheduler"], (mean * scaling_factor, std * scaling_factor),
                               digits, colours, embeddings, opts, generator)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    record = {"options": asdict(opts), "train_seconds": round(time.time() - start, 1),
              "torch_threads": torch.get_num_threads(), "versions": _versions()}
    return replace_path(opts.output_dir, lambda tmp: _save_pipeline(pipe, tmp, record))


def _save_pipeline(pipe, folder: Path, record: dict) -> None:
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "digits_training.json").write_text(json.dumps(record, indent=2) + "\n")


def _versions() -> dict[str, str]:
    import diffusers
    import sklearn
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "scikit-learn": sklearn.__version__}


def cache_dir() -> Path:
    """Where models trained on first use go: $ERASE_CACHE_DIR, else ~/.cache/erase."""
    return Path(os.environ.get("ERASE_CACHE_DIR", Path.home() / ".cache" / "erase"))


def is_digits_model(name_or_path: str, _depth: int = 0) -> bool:
    """The embedded model, or a folder erased from it (erase/train.py's erase_config.json says so)."""
    if name_or_path == MODEL_NAME:
        return True
    folder = Path(name_or_path)
    if (folder / "digits_training.json").is_file():
        return True
    try:
        record = json.loads((folder / "erase_config.json").read_text())
        source = record["config"]["pretrained_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(source, str) and _depth < 8 and is_digits_model(source, _depth + 1)


def resolve_model(name_or_path: str) -> str:
    """Map "digits" to the embedded pipeline's folder (trained on first use if missing); pass others through."""
    if name_or_path != MODEL_NAME:
        return name_or_path
    for folder in (MODEL_DIR, cache_dir() / "digits-sd"):
        if (folder / "model_index.json").is_file():
            return str(folder)
    folder = cache_dir() / "digits-sd"
    logger.warning("no trained digits model found: training it now into %s (about 10 minutes on 2 CPU cores)",
                   folder)
    return str(train_pipeline(DigitsTrainingOptions(output_dir=str(folder))))


# ----------------------------------------------------------------------------- classifier


class DigitsClassifier(nn.Module):
    """A small CNN with two heads: digit (10 classes) and colour (len(COLOURS) classes).

    Input: RGB float images in [0, 1], (B, 3, H, W); other sizes are resized to 32x32.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, num_colours: int = len(COLOURS)) -> None:
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_colours": num_colours}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        # 32 -> 16 -> 8 -> 4 spatially
        self.body = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                                  nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.ReLU())
        self.digit_head = nn.Linear(feature_dim, 10)
        self.colour_head = nn.Linear(feature_dim, num_colours)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, feature_dim)."""
        if x.shape[-2:] != (RESOLUTION, RESOLUTION):
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.digit_head(h), self.colour_head(h)


@dataclass
class ClassifierTrainingOptions:
    """Options of `train_classifier`; saved in the safetensors metadata."""

    output_path: str = field(default=str(CLASSIFIER_PATH), metadata={"help": "safetensors file to write"})
    seed: int = field(default=0, metadata={"help": "seeds weights, data order and augmentation"})
    epochs: int = field(default=25, metadata={"help": "passes over the classifier split in every colour"})
    batch_size: int = field(default=128, metadata={"help": "images per step"})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate (cosine decay)"})

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("epochs, batch_size and learning_rate must be positive")


def _augment(rgb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shifts, brightness, colour tint and noise, so generated (imperfect) digits are judged fairly."""
    n = len(rgb)
    shifts = torch.randint(-2, 3, (n, 2), generator=generator).tolist()
    out = torch.stack([torch.roll(im, shifts=s, dims=(1, 2)) for im, s in zip(rgb, shifts, strict=True)])
    out = out * (0.6 + 0.5 * torch.rand(n, 1, 1, 1, generator=generator))
    tint = 1 + 0.3 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
    leak = 0.15 * torch.rand(n, 3, 1, 1, generator=generator) * out.amax(dim=1, keepdim=True)
    out = out * tint + leak
    return (out + 0.04 * torch.randn(out.shape, generator=generator)).clamp(0, 1)


def train_classifier(opts: ClassifierTrainingOptions) -> DigitsClassifier:
    """Train on the "classifier" split in every colour (never the generator's images); save it."""
    start = time.time()
    torch.manual_seed(opts.seed)
    generator = torch.Generator().manual_seed(opts.seed)
    rgb, digits, colours = coloured_split("classifier")
    model = DigitsClassifier()
    steps_per_epoch = math.ceil(len(rgb) / opts.batch_size)
    total = opts.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.learning_rate, weight_decay=1e-4)
    lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    model.train()
    for index in tqdm(_batches(len(rgb), opts.batch_size, total, generator), total=total, desc="digits classifier"):
        digit_logits, colour_logits = model(_augment(rgb[index], generator))
        loss = F.cross_entropy(digit_logits, digits[index]) + F.cross_entropy(colour_logits, colours[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
    model.eval()
    record = {"options": asdict(opts), "train_seconds": round(time.time() - start, 1)}
    save_classifier(model, Path(opts.output_path), record)
    return model


def save_classifier(model: DigitsClassifier, path: Path, record: dict | None = None) -> None:
    """Weights as safetensors (no pickle); architecture, colours and split in its metadata."""
    from safetensors.torch import save_file

    metadata = {"config": json.dumps(model.config), "colours": json.dumps(COLOURS),
                "split": json.dumps({k: list(v) for k, v in SPLITS.items()}), "record": json.dumps(record or {})}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    replace_path(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def load_digits_classifier(
    device: str | torch.device | None = None, path: str | Path | None = None
) -> DigitsClassifier:
    """The held-out digits classifier in eval mode (trained into the cache on first use if missing)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else _classifier_path()
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    if json.loads(metadata["colours"]) != COLOURS:
        raise ValueError(f"{path} was trained for colours {metadata['colours']}, not {COLOURS}")
    model = DigitsClassifier(**json.loads(metadata["config"]))
    model.load_state_dict(load_file(str(path)))
    return model.to(device or "cpu").eval()


def _classifier_path() -> Path:
    cached = cache_dir() / "digits_classifier.safetensors"
    for path in (CLASSIFIER_PATH, cached):
        if path.is_file():
            return path
    logger.warning("no trained digits classifier found: training it now into %s (about a minute)", cached)
    train_classifier(ClassifierTrainingOptions(output_path=str(cached)))
    return cached


def _to_tensor(images) -> torch.Tensor:
    """A list of PIL images, or a (B, 3, H, W) tensor, -> float (B, 3, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float() / 255 if images.dtype == torch.uint8 else images.float()
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@torch.no_grad()
def classify_images(images, classifier: nn.Module, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted digit and colour indices, (B,) each, for PIL images or a (B, 3, H, W) tensor in [0, 1]."""
    x = _to_tensor(images)
    device = next(classifier.parameters()).device
    preds = [classifier(chunk.to(device)) for chunk in x.split(batch_size)]
    digit = torch.cat([p[0].argmax(-1) for p in preds]).cpu()
    colour = torch.cat([p[1].argmax(-1) for p in preds]).cpu()
    return digit, colour


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m erase.digits", description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="train the pipeline from scratch")
    parser.add_argument("--train-classifier", action="store_true", help="train the judging classifier")
    parser.add_argument("--output-dir", default=str(MODEL_DIR), help="pipeline folder to write")
    parser.add_argument("--classifier-out", default=str(CLASSIFIER_PATH), help="classifier file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-steps", type=int, default=DigitsTrainingOptions.max_train_steps)
    parser.add_argument("--vae-steps", type=int, default=DigitsTrainingOptions.vae_steps)
    args = parser.parse_args(argv)
    if not (args.train or args.train_classifier):
        parser.error("nothing to do: pass --train and/or --train-classifier")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.train:
        start = time.time()
        opts = DigitsTrainingOptions(output_dir=args.output_dir, seed=args.seed,
                                     max_train_steps=args.max_train_steps, vae_steps=args.vae_steps)
        print(f"pipeline written to {train_pipeline(opts)} in {time.time() - start:.0f} s")
    if args.train_classifier:
        start = time.time()
        train_classifier(ClassifierTrainingOptions(output_path=args.classifier_out, seed=args.seed))
        print(f"classifier written to {args.classifier_out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
