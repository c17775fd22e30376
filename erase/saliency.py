"""Weight saliency: the masking core shared by the Stable Diffusion and classifier paths.

SalUn (Fan et al., ICLR 2024, Eq. 5-6): the saliency of a weight is |grad_theta L_f| where
L_f is the loss on the forget set, summed over the whole forget set *before* the absolute
value is taken; the mask keeps the top `ratio` fraction of all selected weights under one
global threshold (not per layer). Only mask==1 weights may change during unlearning.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from erase.atomic import replace_path
from erase.command import BadInput
from erase.sharding import gather_over_processes, is_sharded, local, set_gradient_sum, sum_over_processes

logger = logging.getLogger(__name__)

__all__ = [
    "MaskedUpdate",
    "compute_saliency_mask",
    "global_topk_mask",
    "load_mask",
    "mask_fraction",
    "pack_bits",
    "save_mask",
    "select_parameters",
    "unpack_bits",
]

MASK_FORMAT = "erase-saliency-mask/1"


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


def mask_fraction(mask: Mapping[str, torch.Tensor], sharded: bool = False) -> float:
    """The fraction of weights the mask keeps (`sharded`: over every process's rows)."""
    counts = torch.tensor([sum(int(m.sum()) for m in mask.values()), sum(m.numel() for m in mask.values())], dtype=torch.int64)
    kept, total = sum_over_processes(counts, sharded).tolist()
    return kept / max(1, total)


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
    try:
        while True:
            for batch in tqdm(batches, desc="saliency", disable=not show_progress):
                loss = loss_fn(model, batch)
                (loss * loss_scale if loss_scale != 1 else loss).backward()  # .grad accumulates the sum over batches
            if loss_scale == 1 or _all_finite([p for _, p in selected]):
                break
            loss_scale /= 2
            logger.warning("saliency gradients overflowed: summing again with loss scale %g", loss_scale)
            for _, p in selected:
                p.grad = None
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        scores = {}
        for name, p in selected:
            grad = local(p.grad) if p.grad is not None else torch.zeros_like(local(p))
            p.grad = None
            if distributed and torch.distributed.get_world_size() > 1 and not sharded:
                torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
            scores[name] = grad.float().abs_()  # in place for fp32: no copy
        mask = global_topk_mask(scores, ratio, sharded=sharded)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
            p.grad = None
        if sharded:
            set_gradient_sum(model, mean=True)
    logger.info("saliency mask keeps %.4f of the selected weights", mask_fraction(mask, sharded))
    return mask


def _all_finite(params: Sequence[torch.nn.Parameter]) -> bool:
    """Whether every parameter's gradient is finite, in one host sync (a distributed run agrees on it)."""
    ok = torch.ones((), dtype=torch.bool, device=local(params[0]).device)
    for p in params:
        if p.grad is not None:
            ok &= torch.isfinite(local(p.grad)).all().to(ok.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        bad = (~ok).to(torch.int32)
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # gloo and nccl: on the gradients' device
        return not bool(bad)
    return bool(ok)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries a byte, first entry in the high bit (numpy.packbits'
    order), on the mask's device."""
    flat = mask.reshape(-1).to(torch.uint8)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `pack_bits`: a bool tensor of `shape` on the device of `packed`."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[: int(np.prod(shape, dtype=np.int64))].view(tuple(shape)).bool()


def save_mask(mask: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
    """Write the mask bit-packed (1 bit per weight) to a safetensors file, atomically."""
    tensors, shapes = {}, {}
    for name, m in mask.items():
        tensors[name] = pack_bits(m.detach().bool()).cpu()
        shapes[name] = list(m.shape)
    meta = {"format": MASK_FORMAT, "shapes": json.dumps(shapes), "ratio": repr(mask_fraction(mask))}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    replace_path(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_mask_shapes(path: str | os.PathLike, shard: bool = False) -> dict[str, list[int]]:
    """The names and shapes a mask file holds, from its header alone; one clear error for a missing,
    corrupt or foreign file, and for one process's rows of a sharded run's mask (unless `shard`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for a damaged file
        raise BadInput(f"{path} is not a readable safetensors file ({err})".splitlines()[0]) from None
    if meta.get("format") != MASK_FORMAT:
        raise BadInput(f"{path} is not a saliency mask written by this toolkit")
    if "sharding" in meta and not shard:
        raise BadInput(f"{path} holds one process's rows of a sharded run's mask: pass the run's saliency_mask.safetensors")
    return json.loads(meta["shapes"])


def load_mask(path: str | os.PathLike, model: torch.nn.Module | None = None, shard: bool = False) -> dict[str, torch.Tensor]:
    """Read a mask written by `save_mask`; with `model`, check every name and shape against it
    (`shard`: this process's rows of a sharded run's mask, against its rows of the model)."""
    path = os.fspath(path)
    shapes = read_mask_shapes(path, shard)
    try:
        with safe_open(path, framework="pt") as f:
            mask = {name: unpack_bits(f.get_tensor(name), shape) for name, shape in shapes.items()}
    except Exception as err:
        raise BadInput(f"{path}: the mask's data is damaged ({err})".splitlines()[0]) from None
    if model is not None:
        check_mask_matches(mask, model, source=path, whole=not shard)
    return mask


def check_mask_matches(mask: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str = "mask", whole: bool = False) -> None:
    """Every name of `mask` is a parameter of `model` of the mask's shape: the whole parameter's
    (`whole`), or this process's rows of a sharded parameter."""
    params = dict(model.named_parameters())
    missing = [n for n in mask if n not in params]
    if missing:
        raise BadInput(f"{source} does not fit this model: {len(missing)} names not in the model, e.g. {missing[0]!r}")
    for name, m in mask.items():
        shape = tuple(params[name].shape if whole else local(params[name]).shape)
        if tuple(m.shape) != shape:
            raise BadInput(
                f"{source} does not fit this model: {name!r} has shape {tuple(m.shape)} in the mask "
                f"and {shape} in the model"
            )


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
