"""What a UNet is conditioned on besides x_t and t, as one structure for every model family.

SD 1.x and 2.x condition on the text encoder's hidden states alone. SDXL adds the pooled text
embedding of its second encoder and the size/crop `time_ids` (`added_cond_kwargs`). Prompt
encoding builds a `Conditioning`; the losses call the UNet with `unet_kwargs(cond)`. Indexing,
concatenation and broadcasting go through here, so no other module special-cases SDXL.
Plain tensors are accepted wherever a `Conditioning` is: they are the hidden states alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

__all__ = ["Conditioning", "cat", "unet_kwargs"]


@dataclass
class Conditioning:
    hidden_states: torch.Tensor  # (B, 77, D): the text encoder(s)' last hidden states
    text_embeds: torch.Tensor | None = None  # (B, P): SDXL's pooled embedding of text_encoder_2
    time_ids: torch.Tensor | None = None  # (B, 6): SDXL's original size, crop corner, target size

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        return Conditioning(*(None if (t := getattr(self, f.name)) is None else fn(t) for f in fields(self)))

    def __len__(self) -> int:
        return len(self.hidden_states)

    def __getitem__(self, rows) -> Conditioning:
        return self._map(lambda t: t[rows])

    def expand(self, n: int, *_) -> Conditioning:
        """One row broadcast to n rows, as `tensor.expand(n, -1, -1)` does (no copy)."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def to(self, *args, **kwargs) -> Conditioning:
        return self._map(lambda t: t.to(*args, **kwargs))

    def float(self) -> Conditioning:
        return self._map(lambda t: t.float())

    @property
    def device(self) -> torch.device:
        return self.hidden_states.device


def cat(items: Sequence[Conditioning | torch.Tensor]) -> Conditioning | torch.Tensor:
    """Rows of several conditionings (or plain hidden states) in one."""
    if all(isinstance(c, torch.Tensor) for c in items):
        return torch.cat(list(items))
    items = [c if isinstance(c, Conditioning) else Conditioning(c) for c in items]
    parts = [[getattr(c, f.name) for c in items] for f in fields(Conditioning)]
    return Conditioning(*(None if any(p is None for p in group) else torch.cat(group) for group in parts))


def unet_kwargs(cond: Conditioning | torch.Tensor) -> dict:
    """The UNet's keyword arguments for `cond`: `encoder_hidden_states`, plus SDXL's `added_cond_kwargs`."""
    if isinstance(cond, torch.Tensor):
        return {"encoder_hidden_states": cond}
    added = None if cond.text_embeds is None else {"text_embeds": cond.text_embeds, "time_ids": cond.time_ids}
    return {"encoder_hidden_states": cond.hidden_states, "added_cond_kwargs": added}
