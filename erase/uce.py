"""UCE, unified concept editing (Gandikota et al., WACV 2024): the closed-form erasure.

Every cross-attention key and value projection W (text embedding -> attention space) becomes the
minimiser of

    lambda ||W - W_old||^2 + s_e sum_i ||W c_i - W_old c*_i||^2 + s_p sum_j ||W c_j - W_old c_j||^2

over the token embeddings c_i of the forget prompts, c*_i of their anchors at the same positions,
and c_j of the preserved prompts:

    W = (lambda W_old + s_e sum W_old c*_i c_i^T + s_p sum W_old c_j c_j^T)
        (lambda I     + s_e sum c_i c_i^T        + s_p sum c_j c_j^T)^-1.

On SD3 and Flux (MMDiT transformers, no cross-attention) the edited projections are those that read
the text encoders' outputs directly, as in the authors' Flux script (uce_flux_edit.py): the
`context_embedder` (the text token sequence: SD3's CLIP-L + CLIP-G + T5, Flux's T5) and the pooled
text embedder's first layer `time_text_embed.text_embedder.linear_1` (the pooled CLIP embedding), each
with its own matrix M. The authors pair one token (the last before </s>) of each prompt; this code
pairs the positions of the rule below in every text encoder's part of the sequence.

Every projection reads the same text embeddings, so the sums factor out of W_old:
W = W_old (lambda I + s_e X + s_p P)(lambda I + s_e C + s_p P)^-1 with X = sum c*_i c_i^T,
C = sum c_i c_i^T, P = sum c_j c_j^T, one D x D matrix for the whole UNet.

Which tokens enter, as in the authors' code: of a forget prompt, its last word and every position
after it (the end token and the padding the UNet also attends to), paired position by position
with its anchor's from the anchor's last word on; every position of each preserved prompt. One
extension: where the anchor swaps words for words of the same token count, the pairs start at the
first swapped token, so that a concept named mid-prompt (a colour before the digit) is edited too;
for a concept named last, as in the paper's prompts, this is the authors' rule. The
empty prompt is always preserved (classifier-free guidance's unconditional branch reads it; the
authors' code preserves it when no prompt is given).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from erase.families import denoiser, family, is_flow
from erase.sd import encode_prompts

__all__ = ["UCEScales", "cross_attention_projections", "uce_edit", "uce_matrix", "uce_pooled_matrix"]


@dataclass(frozen=True)
class UCEScales:
    lam: float = 0.1  # lambda: pull towards the original weights
    erase: float = 1.0  # s_e
    preserve: float = 0.1  # s_p, per preserved prompt


def cross_attention_projections(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """{parameter name of the weight: layer} for the to_k and to_v of every cross-attention (a UNet), or
    a transformer's text projections: {"context_embedder.weight": ...} (the sequence) and the pooled one."""
    from diffusers.models.attention_processor import Attention

    if hasattr(unet, "context_embedder"):
        return {"context_embedder.weight": unet.context_embedder}

    found = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            for part in ("to_k", "to_v"):
                found[f"{name}.{part}.weight"] = getattr(module, part)
    if not found:
        raise ValueError("the UNet has no cross-attention: UCE edits its key and value projections")
    return found


def _starts(tokenizer, forget: str, anchor: str) -> tuple[int, int]:
    """Where the edited positions begin in the forget prompt and in its anchor: each prompt's last
    word (before the end token), as in the authors' code; or, when the anchor swaps words for words
    of the same token count, the first position where the two differ (a concept named mid-prompt,
    "a red ... seven" -> "a green ... seven", is edited from its own word on)."""
    ids = [tokenizer(p, truncation=True, max_length=tokenizer.model_max_length).input_ids for p in (forget, anchor)]
    last_f, last_a = max(len(ids[0]) - 2, 0), max(len(ids[1]) - 2, 0)
    if len(ids[0]) == len(ids[1]):
        first = next((i for i, (f, a) in enumerate(zip(*ids)) if f != a), last_f)
        return min(first, last_f), min(first, last_a)
    return last_f, last_a


def _segments(pipe, length: int) -> list[tuple[object, int, int]]:
    """(tokenizer, first position, end) of each text encoder's part of the conditioning sequence."""
    if family(pipe) == "flux":  # T5 alone
        return [(pipe.tokenizer_2, 0, length)]
    if family(pipe) == "sd3":  # the CLIPs' 77 positions, then T5's
        clip = pipe.tokenizer_max_length
        return [(pipe.tokenizer, 0, clip)] + ([(pipe.tokenizer_3, clip, length)] if pipe.tokenizer_3 is not None else [])
    return [(pipe.tokenizer, 0, length)]


def _aligned_rows(pipe, forget: Sequence[str], anchor: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_i, c*_i) stacked over every pair: in each text encoder's part of the sequence, each forget
    prompt's embeddings from its start on, and its anchor's from the anchor's start on, cut to the same length."""
    hidden_f = encode_prompts(pipe, list(forget)).hidden_states
    hidden_a = encode_prompts(pipe, list(anchor)).hidden_states
    keys, targets = [], []
    for tokenizer, begin, end in _segments(pipe, hidden_f.shape[1]):
        for i, (f, a) in enumerate(zip(forget, anchor)):
            start_f, start_a = (begin + s for s in _starts(tokenizer, f, a))
            n = end - max(start_f, start_a)
            keys.append(hidden_f[i, start_f : start_f + n])
            targets.append(hidden_a[i, start_a : start_a + n])
    return torch.cat(keys), torch.cat(targets)


def _closed_form(keys: torch.Tensor, targets: torch.Tensor, kept: torch.Tensor, scales: UCEScales) -> torch.Tensor:
    """M = (lambda I + s_e X + s_p P)(lambda I + s_e C + s_p P)^-1 from rows c_i, c*_i and c_j (float64)."""
    keys, targets, kept = keys.double(), targets.double(), kept.double()
    eye = torch.eye(keys.shape[1], dtype=torch.float64, device=keys.device)
    preserved = kept.T @ kept
    left = scales.lam * eye + scales.erase * targets.T @ keys + scales.preserve * preserved
    right = scales.lam * eye + scales.erase * keys.T @ keys + scales.preserve * preserved
    # M = left @ right^-1; right is symmetric positive definite, so solve instead of inverting
    return torch.linalg.solve(right, left.T).T


@torch.no_grad()
def uce_matrix(pipe, forget: Sequence[str], anchor: Sequence[str], preserve: Sequence[str],
               scales: UCEScales = UCEScales()) -> torch.Tensor:
    """The D x D matrix M with W_new = W_old M for every projection (float64, on the text encoder's device)."""
    if len(forget) != len(anchor) or not forget:
        raise ValueError("UCE needs one anchor prompt per forget prompt")
    keys, targets = _aligned_rows(pipe, forget, anchor)
    kept = encode_prompts(pipe, list(dict.fromkeys(["", *preserve]))).hidden_states.flatten(0, 1)
    return _closed_form(keys, targets, kept, scales)


@torch.no_grad()
def uce_pooled_matrix(pipe, forget: Sequence[str], anchor: Sequence[str], preserve: Sequence[str],
                      scales: UCEScales = UCEScales()) -> torch.Tensor:
    """The same closed form over the pooled text embeddings (SD3, Flux): one row per prompt."""
    keys, targets = encode_prompts(pipe, list(forget)).text_embeds, encode_prompts(pipe, list(anchor)).text_embeds
    kept = encode_prompts(pipe, list(dict.fromkeys(["", *preserve]))).text_embeds
    return _closed_form(keys, targets, kept, scales)


@torch.no_grad()
def uce_edit(pipe, forget: Sequence[str], anchor: Sequence[str], preserve: Sequence[str],
             scales: UCEScales = UCEScales()) -> dict[str, torch.Tensor]:
    """Edit the pipeline's UNet (or transformer) in place; returns {weight name: True-mask} of what
    changed (every entry of the edited projections), in the layout of a saliency mask."""
    model = denoiser(pipe)
    edits = [(cross_attention_projections(model), uce_matrix(pipe, forget, anchor, preserve, scales))]
    if is_flow(pipe):
        pooled = {"time_text_embed.text_embedder.linear_1.weight": model.time_text_embed.text_embedder.linear_1}
        edits.append((pooled, uce_pooled_matrix(pipe, forget, anchor, preserve, scales)))
    edited = set()
    for layers, m in edits:
        for name, layer in layers.items():
            w = layer.weight
            w.copy_((w.double() @ m.to(w.device)).to(w.dtype))
            edited.add(name)
    return {name: torch.full(p.shape, name in edited, dtype=torch.bool) for name, p in model.named_parameters()}
