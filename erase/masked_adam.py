"""Adam with moments for the salient weights only.

SalUn moves only the weights its mask lets move, yet a dense Adam keeps two fp32 moments for
every weight of every tensor that has one such weight: at mask ratio 0.5 half of that state is
zeros forever. `MaskedAdam` keeps the moments of the mask==1 entries alone, packed in the order of
`tensor[mask]`, and holds each mask bit-packed (1 bit per weight), so its state is about half of
Adam's at ratio 0.5 (4.125 bytes per weight instead of 8).

Under FSDP each process keeps the moments of its own rows' masked entries (erase/sharding.py).

Masked master weights (`masters=True`, `--master-weights masked`): the model's weights stay in the
training precision (bf16) and only the mask's entries keep fp32 master copies, packed beside their
moments; each step updates the masters and writes them back, rounded, into the weights. A 12B
transformer then holds 2 bytes a weight plus 12 a salient weight, not 16 a weight. On fp32 weights
the masters are copies of the weights and the update is the same to the last bit.

Its arithmetic is torch.optim.Adam's single-tensor path (what runs on the CPU), element by element:
the masked entries get exactly the update dense Adam gives them under a masked gradient (the
mask==0 ones, whose moments stay 0, never move), to the last bit on the CPU. Mask==0 weights are
never written. No weight decay: SalUn's Adam has none, and decay would move frozen weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from erase.saliency import check_mask_matches, pack_bits, unpack_bits
from erase.sharding import local, moving_tensors

__all__ = ["MaskedAdam", "optimizer_state_bytes"]


class MaskedAdam(torch.optim.Optimizer):
    packs_moments = True  # its moments are plain tensors of the mask's entries, also on sharded parameters

    def __init__(self, model: torch.nn.Module, mask: Mapping[str, torch.Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, sharded: bool = False,
                 masters: bool = False) -> None:
        check_mask_matches(mask, model)
        named = dict(model.named_parameters())
        moving = moving_tensors(mask, sharded)  # sharded: a tensor whose rows here are all frozen still steps (empty)
        params = [named[n] for n in mask if n in moving]
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        # the bits live outside `state`: a checkpoint holds the moments, the mask file the mask; the count of
        # each tensor's mask entries, known here, lets a step find them with no host sync
        self._packed = {named[n]: pack_bits(m.to(local(named[n]).device)) for n, m in mask.items() if n in moving}
        self._count = {named[n]: int(m.sum()) for n, m in mask.items() if n in moving}
        self.masters = masters

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts loaded state to the weights' dtype: the fp32 masters and moments beside bf16 weights
        are put back as saved (on the weights' device), not rounded to bf16."""
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params, strict=True):
            for key, value in state_dict["state"].get(i, {}).items():
                if key != "step" and torch.is_tensor(value):
                    self.state[p][key] = value.to(device=local(p).device, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                weights = local(p)  # a sharded (FSDP) parameter: its own rows, with the mask of those rows
                # the mask's entries as flat indices of a size known in advance: no device-to-host sync
                # (boolean indexing asks the device how many entries there are, per tensor and step)
                chosen = torch.nonzero_static(unpack_bits(self._packed[p], weights.shape).reshape(-1),
                                              size=self._count[p]).squeeze(1)
                grad = local(p.grad).reshape(-1).index_select(0, chosen)
                state = self.state[p]
                if not state:
                    if self.masters:  # fp32 copies of the entries that move, taken from the weights once
                        state["master"] = weights.reshape(-1).index_select(0, chosen).float()
                    dtype = torch.float32 if self.masters else grad.dtype
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(grad, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(grad, dtype=dtype, memory_format=torch.preserve_format)
                if self.masters:
                    grad = grad.float()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                # torch.optim.Adam's single-tensor update, on the packed entries
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = state["step"].item()
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                values = state["master"] if self.masters else weights.reshape(-1).index_select(0, chosen)
                values.addcdiv_(exp_avg, denom, value=-step_size)
                weights.view(-1).index_copy_(0, chosen, values.to(weights.dtype))
        return loss


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments and step counters; for MaskedAdam
    also its packed masks and, with masked masters, the masters); of a sharded run, this process's own."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    total = sum(local(t).numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    if isinstance(optimizer, MaskedAdam):
        total += sum(t.numel() * t.element_size() for t in optimizer._packed.values())
    return total
