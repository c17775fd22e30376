"""Words whose embeddings are vectors: what an attack optimises, and what adversarial training needs too.

* `PlaceholderTokens` gives a loaded pipeline new words whose token embeddings the caller sets (and may
  optimise), in every text encoder (both of SDXL's), so prompts keep flowing through the pipeline's own
  code: generation, guidance and SDXL's pooled embeddings work unchanged.
* Relaxed one-hot tokens (UnlearnDiffAtk, Zhang et al., ECCV 2024): rows on the probability simplex
  (`project_simplex`), turned into tokens by sampling or argmax with a straight-through gradient
  (`straight_through_one_hot`); `allowed_token_ids` are the words such a token may become.
* `sweep_timesteps`: the reference attack's timestep sweep.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PlaceholderTokens", "allowed_token_ids", "word_rows", "project_simplex", "straight_through_one_hot", "sweep_timesteps"]


def project_simplex(a: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    """Euclidean projection of each row of `a` onto {x : 0 <= x <= 1, sum(x) = 1}: x = clip(a - mu, 0, 1)
    with the shift mu found by bisection (sum(clip(a - mu)) falls from >= 1 at min(a) - 1 to 0 at max(a))."""
    lo = a.min(dim=-1, keepdim=True).values - 1
    hi = a.max(dim=-1, keepdim=True).values
    for _ in range(iterations):
        mu = (lo + hi) / 2
        above = (a - mu).clamp(0, 1).sum(dim=-1, keepdim=True) > 1
        lo, hi = torch.where(above, mu, lo), torch.where(above, hi, mu)
    return (a - (lo + hi) / 2).clamp(0, 1)


class _StraightThrough(torch.autograd.Function):
    """Forward: one-hot of a token drawn from (or the argmax of) each row; backward: the gradient,
    clipped to [-1, 1], passed straight to the relaxed vector (UnlearnDiffAtk's estimator)."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, generator: torch.Generator | None, sample: bool) -> torch.Tensor:
        if sample:
            index = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            index = probs.argmax(dim=-1)
        return F.one_hot(index, probs.shape[-1]).to(probs.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return F.hardtanh(grad), None, None


def straight_through_one_hot(probs: torch.Tensor, generator: torch.Generator | None = None,
                             sample: bool = True) -> torch.Tensor:
    """(k, V) relaxed one-hot rows -> (k, V) one-hot rows, differentiable straight through."""
    return _StraightThrough.apply(probs, generator, sample)


class _EmbeddingWithPlaceholders(nn.Module):
    """A text encoder's token embedding in which placeholder ids take given vectors."""

    def __init__(self, base: nn.Embedding, ids: list[int]) -> None:
        super().__init__()
        self.base, self.ids = base, ids
        self.vectors: torch.Tensor | None = None  # (len(ids), D), set by PlaceholderTokens.set

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.base.num_embeddings - 1))
        if self.vectors is None:
            return out
        for j, token_id in enumerate(self.ids):
            out = torch.where((input_ids == token_id).unsqueeze(-1), self.vectors[j].to(out.dtype), out)
        return out


class PlaceholderTokens:
    """New words for a loaded pipeline whose embeddings are vectors the caller sets (and may optimise):
    every text encoder of the pipeline (two for SDXL and Flux, three for SD3 with T5) sees `vectors[e][j]` wherever its tokenizer
    produced placeholder j. Prompts keep flowing through the pipeline's own code, so generation,
    guidance and SDXL's pooled embeddings work unchanged. Inside the block the pipeline's tokenizers
    are copies that know the words; on exit the pipeline gets its own tokenizers and token
    embeddings back, untouched (a pipeline saved afterwards knows no placeholder).

        with PlaceholderTokens(pipe, ["<a>", "<b>"]) as words:
            words.set([v])  # v: (2, D) for each text encoder
            images = generate(pipe, ["<a> <b> a photo"], ...)
    """

    def __init__(self, pipe, words: Sequence[str]) -> None:
        self.pipe, self.words = pipe, list(words)
        self.names = [(t, e) for t, e in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"),
                                                 ("tokenizer_3", "text_encoder_3"))
                      if getattr(pipe, e, None) is not None]
        self.pairs = [(getattr(pipe, t), getattr(pipe, e)) for t, e in self.names]
        self.modules: list[_EmbeddingWithPlaceholders] = []
        self._saved: list[tuple[nn.Module, Any]] = []
        self._tokenizers: dict[str, Any] = {}

    def __enter__(self) -> Self:
        pairs = []
        for (name, _), (tokenizer, encoder) in zip(self.names, self.pairs, strict=True):
            self._tokenizers[name] = tokenizer
            tokenizer = copy.deepcopy(tokenizer)
            setattr(self.pipe, name, tokenizer)
            pairs.append((tokenizer, encoder))
        self.pairs = pairs
        for tokenizer, encoder in self.pairs:
            tokenizer.add_tokens(self.words)
            ids = tokenizer.convert_tokens_to_ids(self.words)
            module = _EmbeddingWithPlaceholders(encoder.get_input_embeddings(), ids)
            pooling = _pooling_module(encoder)
            self._saved.append((encoder, getattr(pooling, "eos_token_id", None)))  # T5 pools nothing
            encoder.set_input_embeddings(module)
            # Why: configs with eos_token_id 2 (SD 1.x, SDXL) pool at argmax(input_ids), which a new
            # word's id would win; the end-of-text id pools at the same place for every other prompt.
            if getattr(pooling, "eos_token_id", None) == 2:
                pooling.eos_token_id = tokenizer.eos_token_id
            self.modules.append(module)
        return self

    def __exit__(self, *exc) -> None:
        for (encoder, eos), module in zip(self._saved, self.modules, strict=True):
            encoder.set_input_embeddings(module.base)
            if eos is not None:
                _pooling_module(encoder).eos_token_id = eos
        for name, tokenizer in self._tokenizers.items():
            setattr(self.pipe, name, tokenizer)
        self.pairs = [(self._tokenizers[t], getattr(self.pipe, e)) for t, e in self.names]
        self._saved, self.modules, self._tokenizers = [], [], {}

    def embedding_matrices(self) -> list[torch.Tensor]:
        """Each text encoder's (V, D) token embedding weights."""
        return [m.base.weight for m in self.modules]

    def set(self, vectors: Sequence[torch.Tensor]) -> None:
        """One (len(words), D) tensor per text encoder."""
        for module, v in zip(self.modules, vectors, strict=True):
            module.vectors = v


def _pooling_module(encoder: nn.Module) -> nn.Module:
    """The module that holds `eos_token_id` for pooling (transformers 5: the CLIPTextModel itself,
    or the `text_model` of CLIPTextModelWithProjection; transformers 4: `text_model` of both)."""
    return getattr(encoder, "text_model", encoder)


def sweep_timesteps(num_train_timesteps: int, n: int) -> list[int]:
    """n timesteps evenly spaced over [0, T), centred in their bins, ascending (the reference attack's
    sweep: T = 1000, n = 50 gives 10, 30, ..., 990)."""
    n = min(n, num_train_timesteps)
    step = num_train_timesteps // n
    return [step // 2 + i * step for i in range(n)]


def allowed_token_ids(tokenizer, rows: int) -> torch.Tensor:
    """Token ids an adversarial token may take: those both the tokenizer can write and the encoder has
    rows for (placeholders excluded), less the special tokens."""
    banned = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(min(tokenizer.vocab_size, rows)) if i not in banned])


def word_rows(source_tokenizer, ids: torch.Tensor, tokenizer, matrix: torch.Tensor) -> torch.Tensor:
    """(len(ids), D) rows of `matrix` (the token embeddings of `tokenizer`) for the words that
    `source_tokenizer`'s tokens `ids` spell: the rows themselves where both tokenizers share a
    vocabulary (SDXL's and SD3's two CLIPs), else the mean row of the word's pieces in `tokenizer`
    (T5 in SD3 and Flux: each relaxed CLIP token is seen by T5 as the word it writes)."""
    if type(tokenizer).__name__.removesuffix("Fast") == type(source_tokenizer).__name__.removesuffix("Fast") and \
            len(tokenizer) == len(source_tokenizer):
        return matrix[ids.to(matrix.device)]
    words = [source_tokenizer.decode([i]).strip() or source_tokenizer.convert_ids_to_tokens(i) for i in ids.tolist()]
    pieces = [p or [tokenizer.unk_token_id] for p in tokenizer(words, add_special_tokens=False).input_ids]
    owner = torch.tensor([row for row, p in enumerate(pieces) for _ in p], device=matrix.device)
    flat = torch.tensor([i for p in pieces for i in p], device=matrix.device)
    counts = torch.tensor([len(p) for p in pieces], device=matrix.device, dtype=matrix.dtype)
    rows = torch.zeros(len(pieces), matrix.shape[1], device=matrix.device, dtype=matrix.dtype).index_add_(0, owner, matrix[flat])
    return rows / counts[:, None]
