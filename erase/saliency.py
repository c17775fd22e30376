"""Weight saliency: the masking core shared by the Stable Diffusion and classifier paths.

SalUn (Fan et al., ICLR 2024, Eq. 5-6): the saliency of a weight is |grad_theta L_f| where
L_f is the loss on the forget set, summed over the whole forget set *before* the absolute
value is taken; the mask keeps the top `ratio` fraction of all selected weights under one
global threshold (not per layer). Only mask==1 weights may change during unlearning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from erase.mask_files import (  # the mask file's helpers, long imported from here
    MASK_FORMAT,
    check_mask_matches,
    load_mask,
    mask_fraction,
    pack_bits,
    read_mask_shapes,
    save_mask,
    unpack_bits,
)
from erase.sharding import gather_over_processes, is_sharded, local, set_gradient_sum, sum_over_processes

logger = logging.getLogger(__name__)

__all__ = [
    "MASK_FORMAT",
    "MaskedUpdate",
    "check_mask_matches",
    "read_mask_shapes",
    "compute_saliency_mask",
    "global_topk_mask",
    "load_mask",
    "mask_fraction",
    "pack_bits",
    "save_mask",
    "select_parameters",
    "unpack_bits",
]

def check_ratio(ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"mask ratio must be in (0, 1], got {ratio!r}")
    return float(ratio)


def _matches(name: str, target: str) -> bool:
    # exact name, dotted suffix ("attn2.to_k.weight"), or a module on the path ("attn2")
    dotted = f".{name}."
    return name == target or name.endswith("." + target) or f".{target}." in dotted


def select_parameters(
    model: torch.nn.Module, target_modules: str | Sequence[str] | None = None
) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters chosen by `target_modules`.

    None selects every trainable parameter. A string is a regular expression searched in each
    parameter name; a list selects by exact name, dotted suffix, or the name of a module on
    the parameter's path (as peft does). Raises ValueError when nothing matches.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if target_modules is None:
        selected = params
    elif isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        selected = [(n, p) for n, p in params if pattern.search(n)]
    else:
        selected = [(n, p) for n, p in params if any(_matches(n, t) for t in target_modules)]
    if not selected:
        raise ValueError(f"target_modules={target_modules!r} matched no trainable parameter")
    return selected


_BUCKET_SHIFT = 15  # 2^16 buckets over the top bits of the int32 pattern (1/128 of an octave each), 2^15 below


def _kth_largest_bits(bits: Sequence[torch.Tensor], k: int, sharded: bool = False) -> int:
    """Bit pattern of the k-th largest value (radix select): a histogram of the top 16 bits finds
    the bucket holding it, a histogram of the low 15 bits of that bucket's values finds the value.
    Sharded, the two histograms are summed over the processes: two all-reduces of counts."""
    device = bits[0].device
    hist = torch.zeros(1 << (31 - _BUCKET_SHIFT), dtype=torch.int64, device=device)
    for b in bits:
        hist += torch.bincount((b >> _BUCKET_SHIFT).reshape(-1).long(), minlength=len(hist)).to(device)
    bucket, rank = _bucket_of_rank(sum_over_processes(hist, sharded), k)
    low = torch.zeros(1 << _BUCKET_SHIFT, dtype=torch.int64, device=device)
    for b in bits:
        inside = b[(b >> _BUCKET_SHIFT) == bucket]
        low += torch.bincount((inside & ((1 << _BUCKET_SHIFT) - 1)).long(), minlength=len(low)).to(device)
    value, _ = _bucket_of_rank(sum_over_processes(low, sharded), rank)
    return (bucket << _BUCKET_SHIFT) | value


def _bucket_of_rank(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest of the counted values, and its rank inside the bucket."""
    above = hist.flip(0).cumsum(0).flip(0)  # above[i] = count in buckets >= i
    bucket = int(torch.nonzero(above >= k).max())
    return bucket, k - (int(above[bucket + 1]) if bucket + 1 < len(above) else 0)


def _ties_to_take(ties: torch.Tensor, need: int, sharded: bool) -> list[int]:
    """How many of this process's ties at the threshold each tensor keeps: `need` of them in the
    global order, tensor by tensor and, inside a tensor, rank by rank (dim-0 shards in rank order)."""
    counts, me = gather_over_processes(ties, sharded)
    take = []
    for t in range(len(counts[0])):
        for r, row in enumerate(counts):
            n = min(need, row[t])
            need -= n
            if r == me:
                take.append(n)
    return take


def global_topk_mask(scores: Mapping[str, torch.Tensor], ratio: float, sharded: bool = False) -> dict[str, torch.Tensor]:
    """Keep exactly round(ratio * N) of the largest scores across all tensors.

    Non-negative float32 scores compare like their int32 bit patterns, so the k-th largest
    value is found by a radix select on the bits: two histogram passes, with no sort and no
    concatenated copy of all scores (the full SD UNet has 860M weights).
    Ties at the threshold are broken by position: earlier tensors (in mapping order) and
    earlier flat indices win.

    `sharded`: each process holds its dim-0 shard of every score tensor (FSDP, erase/sharding.py),
    N counts all of them, and the mask of its own rows comes back; the threshold and the ties
    are those of one process holding every tensor (a few collectives of counts).
    """
    ratio = check_ratio(ratio)
    bits = {}
    for name, s in scores.items():
        s = s.detach().float()
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError(f"saliency scores of {name!r} must be finite and non-negative")
        bits[name] = s.view(torch.int32)
    device = next(iter(bits.values())).device
    total = int(sum_over_processes(torch.tensor(sum(b.numel() for b in bits.values()), device=device), sharded))
    k = round(ratio * total)
    if k == 0:
        raise ValueError(f"ratio {ratio} keeps no weight out of {total}")
    threshold = _kth_largest_bits(list(bits.values()), k, sharded)
    above = sum_over_processes(torch.tensor(sum(int((b > threshold).sum()) for b in bits.values()), device=device), sharded)
    need = k - int(above)  # ties at the threshold to keep
    ties = torch.tensor([int((b == threshold).sum()) if need > 0 else 0 for b in bits.values()], dtype=torch.int64, device=device)
    take = _ties_to_take(ties, need, sharded)
    mask = {}
    for (name, b), n in zip(bits.items(), take):
        m = b > threshold
        if n:
            tie = (b == threshold).reshape(-1)
            m |= (tie & (tie.cumsum(0) <= n)).view(b.shape)
        mask[name] = m
    return mask


def compute_saliency_mask(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    ratio: float = 0.5,
    target_modules: str | Sequence[str] | None = None,
    show_progress: bool = True,
    loss_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Saliency mask {parameter name: BoolTensor} from the forget-set loss.

    `loss_fn(model, batch)` returns a scalar loss on one forget batch. Gradients are summed
    over all batches (and over processes when torch.distributed is initialised: pass the
    plain model, not a DDP wrapper), the absolute value is taken after summing, and one global
    threshold keeps the top `ratio` fraction of the selected weights. Extra memory beyond the
    model is one gradient per selected weight plus one byte of mask per weight.

    `loss_scale` multiplies each loss before its backward pass, as a GradScaler does: under fp16
    autocast the activations' gradients underflow otherwise (SDXL at 1024 px: ~3e-5 per element,
    below fp16's smallest normal). A power of two, so the ranking is that of the unscaled sum; on
    an overflow (a non-finite gradient) the sum is redone at half the scale.
    """
    ratio = check_ratio(ratio)
    batches = list(batches)
    selected = select_parameters(model, target_modules)
    names = {id(p) for _, p in selected}
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for _, p in model.named_parameters():
        p.requires_grad_(id(p) in names)  # no gradient memory for unselected weights
        p.grad = None
    sharded = any(is_sharded(p) for _, p in selected)  # FSDP: each process sums its rows over every process
    if sharded:
        set_gradient_sum(model, mean=False)
    sums = _Fp32Sums(selected, sharded)  # weights below fp32 (--master-weights masked): their sums in fp32
    try:
        while True:
            for batch in tqdm(batches, desc="saliency", disable=not show_progress):
                loss = loss_fn(model, batch)
                (loss * loss_scale if loss_scale != 1 else loss).backward()  # .grad accumulates the sum over batches
                sums.fold()
            if loss_scale == 1 or _all_finite([p for _, p in selected], sums):
                break
            loss_scale /= 2
            logger.warning("saliency gradients overflowed: summing again with loss scale %g", loss_scale)
            sums.clear()
            for _, p in selected:
                p.grad = None
        sums.remove()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        scores = {}
        for name, p in selected:
            grad = sums.pop(p) if p in sums else local(p.grad) if p.grad is not None else torch.zeros_like(local(p))
            p.grad = None
            if distributed and torch.distributed.get_world_size() > 1 and not sharded:
                torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
            scores[name] = grad.float().abs_()  # in place for fp32: no copy
        mask = global_topk_mask(scores, ratio, sharded=sharded)
    finally:
        sums.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
            p.grad = None
        if sharded:
            set_gradient_sum(model, mean=True)
    logger.info("saliency mask keeps %.4f of the selected weights", mask_fraction(mask, sharded))
    return mask


def _all_finite(params: Sequence[torch.nn.Parameter], sums: _Fp32Sums | None = None) -> bool:
    """Whether every parameter's gradient (or its fp32 sum) is finite, in one host sync (a distributed run agrees on it)."""
    ok = torch.ones((), dtype=torch.bool, device=local(params[0]).device)
    for p in params:
        grad = sums.get(p) if sums is not None and p in sums else p.grad
        if grad is not None:
            ok &= torch.isfinite(local(grad)).all().to(ok.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        bad = (~ok).to(torch.int32)
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # gloo and nccl: on the gradients' device
        return not bool(bad)
    return bool(ok)


class MaskedUpdate:
    """Confine an optimizer to the mask==1 weights, bit-exactly.

    Gradients are masked in place just before each `optimizer.step()`, so the optimizer's moments
    see only the salient entries. For SGD (with momentum), Adam and AdamW without weight decay and
    with a fresh state, a zero gradient is then an exact no-op and nothing more is needed. Masking
    the gradient is not enough otherwise: weight decay (AdamW, or L2 in SGD/Adam) still moves
    mask==0 weights, a bug of the SalUn reference code. In that case the mask==0 values are
    saved before every `optimizer.step()` and written back after it.
    Parameters not named in the mask are left alone. The mask is held bit-packed on each
    weight's device (1 bit per weight: 107 MB for the SD-1.x UNet instead of 860 MB of bools)
    and unpacked one tensor at a time. A sharded (FSDP) parameter takes the mask of its own rows
    (erase.sharding.local_mask) and its local gradient is the one masked.

        update = MaskedUpdate(model, mask).attach(optimizer)
        ...  # an ordinary training loop
        update.remove()
    """

    _ZERO_GRAD_IS_NOOP = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)

    def __init__(self, model: torch.nn.Module, mask: Mapping[str, torch.Tensor]):
        check_mask_matches(mask, model)
        params = dict(model.named_parameters())
        # (parameter, its mask==0 entries packed on its device)
        self.frozen = [(params[n], pack_bits(~m.to(local(params[n]).device))) for n, m in mask.items() if not bool(m.all())]
        self._saved: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self.restores = False

    @classmethod
    def _needs_restore(cls, optimizer: torch.optim.Optimizer) -> bool:
        decays = any(group.get("weight_decay", 0) for group in optimizer.param_groups)
        return decays or type(optimizer) not in cls._ZERO_GRAD_IS_NOOP or bool(optimizer.state)

    def attach(self, optimizer: torch.optim.Optimizer) -> MaskedUpdate:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        self.restores = self._needs_restore(optimizer)
        self._handles.append(optimizer.register_step_pre_hook(lambda *_: self._mask_gradients()))
        if self.restores:
            self._handles.append(optimizer.register_step_pre_hook(lambda *_: self._save()))
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self._restore()))
        return self

    @torch.no_grad()
    def _mask_gradients(self) -> None:
        for p, packed in self.frozen:
            if p.grad is not None:
                grad = local(p.grad)
                grad.masked_fill_(unpack_bits(packed, grad.shape), 0)

    @torch.no_grad()
    def _save(self) -> None:
        self._saved = [local(p)[unpack_bits(packed, local(p).shape)] for p, packed in self.frozen]

    @torch.no_grad()
    def _restore(self) -> None:
        for (p, packed), values in zip(self.frozen, self._saved):
            local(p).masked_scatter_(unpack_bits(packed, local(p).shape), values)
        self._saved = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class _Fp32Sums:
    """The saliency sums of weights held below fp32 (bf16 under --master-weights masked), kept in fp32:
    a bf16 .grad summed over hundreds of batches would round away the small ones. Unsharded, each
    parameter's gradient is added to its sum as soon as backward has accumulated it, and freed, so
    no second whole gradient exists at once; sharded (FSDP sets .grad after its reduce-scatter),
    `fold` adds this process's rows after each batch. fp32 weights are left to .grad, as before."""

    def __init__(self, selected: Sequence[tuple[str, torch.nn.Parameter]], sharded: bool) -> None:
        self.sums: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.sharded = sharded
        self.hooks = []
        for _, p in selected:
            if local(p).dtype == torch.float32:
                continue
            self.sums[p] = torch.zeros(local(p).shape, dtype=torch.float32, device=local(p).device)
            if not sharded:
                self.hooks.append(p.register_post_accumulate_grad_hook(self._add))

    def _add(self, p: torch.nn.Parameter) -> None:
        self.sums[p].add_(local(p.grad).float())
        p.grad = None

    def fold(self) -> None:
        if self.sharded:
            for p in self.sums:
                if p.grad is not None:
                    self._add(p)

    def __contains__(self, p) -> bool:
        return p in self.sums

    def get(self, p) -> torch.Tensor:
        return self.sums[p]

    def pop(self, p) -> torch.Tensor:
        return self.sums.pop(p)

    def clear(self) -> None:
        for t in self.sums.values():
            t.zero_()

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
