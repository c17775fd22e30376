"""Sharded erasure with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each launched process holds 1/n of the UNet's weights, gradients and Adam moments: every
parameter becomes a DTensor sharded on dim 0 in rank order (torch.chunk's split), so rank r's
local rows follow rank r-1's and a tensor's flat order is the ranks' local flat orders in turn.
The saliency mask is computed and held the same way (erase/saliency.py's global threshold over
the shards), checkpoints are one safetensors file of local shards per process, and the published
pipeline is gathered into one plain diffusers folder.

One code path: `erase/train.py --fsdp`, under `accelerate launch` on GPUs (Accelerate's FSDP
plugin, `--use_fsdp --fsdp_version 2`, selects it too) or on the CPU over gloo
(`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`). Reductions are sums
(`set_force_sum_reduction_for_comms`: gloo has no pre-multiplied sum), divided by the process
count for training as DDP's mean, and not divided for the saliency sum.
"""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from erase.command import BadInput

__all__ = ["ShardSizes", "check_checkpoint_sharding", "check_shardable", "collective_device", "full_state_dict", "gather_mask",
           "gather_over_processes", "host_peak_bytes", "is_sharded", "load_sharded", "load_shards", "load_training_state", "local",
           "local_mask", "moving_tensors",
           "save_shards", "save_training_state", "set_gradient_sum", "shard_bytes", "shard_file", "shard_rows", "shard_unet", "sharding_of",
           "sum_over_processes", "shard_units",
           "unsharded_copy"]


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (a view), or the tensor itself."""
    return t.to_local() if is_sharded(t) else t


def collective_device(t: torch.Tensor) -> torch.device:
    """Where a collective can take `t`: nccl needs the GPU, gloo takes either."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def sum_over_processes(t: torch.Tensor, sharded: bool) -> torch.Tensor:
    """`t` summed over the processes when the data is sharded (and more than one process runs)."""
    if sharded and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        moved = t.to(collective_device(t))
        torch.distributed.all_reduce(moved)
        return moved.to(t.device)
    return t


def gather_over_processes(t: torch.Tensor, sharded: bool) -> tuple[list[list[int]], int]:
    """Every process's 1-d integer tensor `t` as rows (in rank order), and this process's row."""
    if not (sharded and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [t.tolist()], 0
    moved = t.to(collective_device(t))
    parts = [torch.empty_like(moved) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, moved)
    return [p.tolist() for p in parts], torch.distributed.get_rank()


def moving_tensors(mask: Mapping[str, torch.Tensor], sharded: bool = False) -> set[str]:
    """The names of the tensors with at least one mask==1 weight (`sharded`: in any process's rows,
    so that every process trains the same tensors)."""
    names = list(mask)
    flags = sum_over_processes(torch.tensor([bool(mask[n].any()) for n in names], dtype=torch.int64), sharded)
    return {n for n, f in zip(names, flags.tolist()) if f}


def shard_units(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP gathers one at a time, innermost first: every transformer layer and every
    resnet, then each attention, each down, mid and up block (what is left of it: its samplers).
    The UNet itself (embeddings, first and last convs) comes last. Sharding at this grain keeps the
    largest gathered unit small: SDXL's ten-layer attentions would otherwise gather 1.3B weights. A
    transformer (SD3, Flux) is sharded block by block, its embedders and output layer with the whole."""
    if hasattr(unet, "transformer_blocks"):  # SD3 / Flux: each joint (and Flux's single) transformer block
        return [*unet.transformer_blocks, *getattr(unet, "single_transformer_blocks", [])]
    units = []
    for block in [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]:
        for attention in getattr(block, "attentions", None) or []:
            units += list(getattr(attention, "transformer_blocks", []))
            units.append(attention)
        units += list(getattr(block, "resnets", None) or [])
        units.append(block)
    return units


def shard_unet(unet: torch.nn.Module, device: torch.device, reshard_after_forward: bool = True,
               param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """fully_shard every unit of `shard_units`, then the UNet, over every launched process; in
    place (the parameters become DTensors). Gradients are reduced as DDP's mean. `param_dtype`
    (bf16 training): each unit is gathered in that precision, half the traffic of fp32 and no fp32
    copy for autocast to cast again, while the shards (the masters) and the gradient reductions
    stay fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for unit in shard_units(unet):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(unet, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    set_gradient_sum(unet, mean=True)
    return unet


def _weight_files(folder: str) -> dict[str, str] | None:
    """{tensor name: file} of a diffusers model folder's safetensors weights (one file, or shards
    with an index); None where it has none."""
    single = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if os.path.isfile(single + ".index.json"):
        with open(single + ".index.json") as f:
            return {name: os.path.join(folder, file) for name, file in json.load(f)["weight_map"].items()}
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    return None


def shard_rows(n: int, rank: int, world: int) -> slice:
    """A process's rows of a dim 0 of length n under FSDP2's split (torch.chunk's: ceil(n / world)
    rows each in rank order, the last processes' short or empty)."""
    size = -(-n // world)
    start = min(rank * size, n)
    return slice(start, min(start + size, n))


@torch.no_grad()
def load_sharded(cls: type[torch.nn.Module], folder: str, device: torch.device, dtype: torch.dtype = torch.float32, *,
                 param_dtype: torch.dtype | None = None, checkpointing: bool = False) -> torch.nn.Module | None:
    """The model in the diffusers model folder `folder` (of class `cls`), sharded as `shard_unet` does
    without any process holding it whole: built on the meta device, sharded, then each process reads
    only its rows of every tensor from the safetensors file(s), in `dtype`. None where the folder's
    weights are not safetensors named as the model's tensors (the caller then loads it whole)."""
    files = _weight_files(folder)
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder)).to(dtype)
    kept = model.state_dict()
    if files is None or set(files) != set(kept) or any(name not in kept for name, _ in model.named_buffers()):
        return None
    if checkpointing:
        model.enable_gradient_checkpointing()
    shard_unet(model, device, param_dtype=param_dtype)
    model.to_empty(device=device)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for path in dict.fromkeys(files.values()):
        with safe_open(path, framework="pt") as f:
            for name in (n for n, file in files.items() if file == path):
                t = tensors[name]
                part = f.get_slice(name)[shard_rows(t.shape[0], rank, world)] if is_sharded(t) else f.get_tensor(name)
                if tuple(part.shape) != tuple(local(t).shape):
                    raise RuntimeError(f"{name}: rows {tuple(part.shape)} read for the shard {tuple(local(t).shape)}")
                local(t).copy_(part)
    return model.eval()


def set_gradient_sum(unet: torch.nn.Module, mean: bool) -> None:
    """Reduce gradients as a plain sum over the processes (the saliency mask's Eq. 8 sum), or as
    their mean (training, as DDP does)."""
    from torch.distributed.fsdp import FSDPModule

    factor = float(torch.distributed.get_world_size()) if mean else 1.0
    for module in unet.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(factor)


def check_shardable(cfg) -> None:
    """What --fsdp (or Accelerate's FSDP plugin) cannot shard, refused before any model loads."""
    if cfg.method == "uce":
        raise ValueError("--fsdp shards training: uce has no training loop (it edits in seconds on one process)")
    if cfg.adversarial and cfg.adversarial_trains != "unet":
        raise ValueError("--fsdp shards the UNet: --adversarial-trains text-encoder or both is not sharded (use --adversarial-trains unet)")
    if cfg.mixed_precision == "fp16":
        raise ValueError("--fsdp trains in fp32 or bf16: fp16's gradient scaler does not take sharded gradients (use bf16)")


def sharding_of(cfg, accelerator) -> bool:
    """Whether this run shards the UNet (--fsdp, or a launch under Accelerate's FSDP plugin); what it
    cannot shard is refused here, before any model loads."""
    from accelerate.utils import DistributedType

    plugin = accelerator.distributed_type == DistributedType.FSDP
    if not (cfg.fsdp or plugin):
        return False
    check_shardable(cfg)
    if plugin and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
        raise BadInput("erase/train.py shards with FSDP2: launch with --fsdp_version 2 (fsdp_version: 2 in a config file)")
    if accelerator.num_processes < 2:
        raise BadInput("--fsdp shards over the launched processes: launch 2 or more (accelerate launch --num_processes N; "
                       "on the CPU with --multi_gpu and ACCELERATE_USE_CPU=1)")
    return True


def check_checkpoint_sharding(checkpoint: str | None, sharded: bool, accelerator) -> None:
    """A checkpoint resumes only under the sharding that wrote it: refused before any model loads."""
    if checkpoint is None:
        return
    shards = sorted(f for f in os.listdir(checkpoint) if f.startswith("unet.rank"))
    mine = os.path.basename(shard_file(checkpoint, "unet", accelerator.process_index, accelerator.num_processes))
    if sharded and mine not in shards:
        written = f"by {shards[0].split('-of-')[1].split('.')[0]} sharded processes" if shards else "without --fsdp"
        raise BadInput(f"{checkpoint} was written {written}; this run shards over {accelerator.num_processes}: relaunch as it was")
    if not sharded and shards:
        raise BadInput(f"{checkpoint} was written by a sharded run ({shards[0]}): relaunch with --fsdp and as many processes")


def local_mask(mask: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A full mask {name: bool tensor of the parameter's full shape} cut to this process's rows of
    each sharded parameter (unsharded parameters keep the whole tensor)."""
    params = dict(model.named_parameters())
    out = {}
    for name, m in mask.items():
        p = params[name]
        if is_sharded(p):
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            chunks = torch.chunk(m, world, dim=0)
            part = chunks[rank] if rank < len(chunks) else m[:0]
            if tuple(part.shape) != tuple(local(p).shape):
                raise RuntimeError(f"{name}: the mask's rows {tuple(part.shape)} are not the shard {tuple(local(p).shape)}")
            out[name] = part.clone()
        else:
            out[name] = m
    return out


def _full(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor from each process's `part` sharded like the DTensor `like` (a collective)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(part, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()).full_tensor()


def gather_mask(mask: Mapping[str, torch.Tensor], model: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """Every process's mask rows put together, one tensor at a time, on the CPU (a collective);
    only a process with `keep` holds on to the whole mask, the others get {}."""
    params = dict(model.named_parameters())
    out = {}
    for name, m in mask.items():
        p = params[name]
        full = _full(m.to(local(p).device, torch.uint8), p).bool() if is_sharded(p) else m
        if keep:
            out[name] = full.cpu()
    return out


@torch.no_grad()
def full_state_dict(model: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU, one tensor at a time (a collective); only a process with
    `keep` holds on to it, the others get {}."""
    out = {}
    for name, t in model.state_dict().items():
        full = t.full_tensor() if is_sharded(t) else t
        if keep:
            out[name] = full.detach().cpu().clone()
    return out


def unsharded_copy(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A plain module of `model`'s class and config holding `state` (what save_pretrained writes)."""
    with torch.device("meta"):
        plain = type(model).from_config(model.config)
    plain.load_state_dict(state, assign=True)
    return plain


def shard_bytes(model: torch.nn.Module) -> dict[str, int]:
    """This process's bytes of parameters and of gradients (those present now)."""
    params = list(model.parameters())
    nbytes = lambda t: local(t).numel() * local(t).element_size()
    return {"parameters": sum(nbytes(p) for p in params), "gradients": sum(nbytes(p.grad) for p in params if p.grad is not None)}


def host_peak_bytes() -> int:
    """This process's peak resident host memory so far (getrusage: KiB on Linux, bytes on macOS)."""
    import sys

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class ShardSizes:
    """This process's bytes of parameters and gradients (read at the first optimizer step, when every
    gradient is there), and the same for all processes."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.gradients = model, None
        self._handle = getattr(optimizer, "optimizer", optimizer).register_step_pre_hook(self._at_step)

    def _at_step(self, *_) -> None:
        self.gradients = shard_bytes(self.model)["gradients"]
        self._handle.remove()

    def record(self, accelerator, optimizer_bytes: int, host_peak_load: int | None = None) -> dict:
        """What erase_config.json says of the sharding (a collective); `optimizer_bytes`: this
        process's optimizer state (erase.masked_adam.optimizer_state_bytes); `host_peak_load`: its
        peak host memory while the models loaded (beside the whole run's, `host_peak`)."""
        mine = shard_bytes(self.model) | {"gradients": self.gradients, "optimizer": optimizer_bytes,
                                          "host_peak_load": host_peak_load, "host_peak": host_peak_bytes()}
        every = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(every, mine)
        params = list(self.model.parameters())
        whole = {"parameters": sum(p.numel() * p.element_size() for p in params),
                 "gradients": sum(p.numel() * p.element_size() for p in params if p.requires_grad)}
        return {"kind": "fsdp2 (torch.distributed.fsdp.fully_shard)", "processes": accelerator.num_processes,
                "per_process_bytes": every, "unsharded_bytes": whole}


# ----------------------------------------------------------------------------- checkpoints


def shard_file(folder: str | os.PathLike, what: str, rank: int, world: int) -> str:
    return os.path.join(folder, f"{what}.rank{rank}-of-{world}.safetensors")


def save_shards(folder: str | os.PathLike, what: str, tensors: Mapping[str, torch.Tensor], rank: int, world: int,
                metadata: Mapping[str, str] | None = None) -> None:
    """This process's tensors (local shards) in one safetensors file of the sharded set `what`."""
    meta = {"sharding": json.dumps({"rank": rank, "world": world}), **(metadata or {})}
    save_file({k: local(v).detach().contiguous().cpu() for k, v in tensors.items()}, shard_file(folder, what, rank, world), metadata=meta)


def load_shards(folder: str | os.PathLike, what: str, rank: int, world: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's file of the sharded set `what`; one clear error when the set was written by
    another number of processes."""
    path = shard_file(folder, what, rank, world)
    if not os.path.isfile(path):
        others = sorted(f for f in os.listdir(folder) if f.startswith(what + ".rank")) if os.path.isdir(folder) else []
        if others:
            raise BadInput(f"{folder} holds {what} sharded for another number of processes ({others[0]}); "
                           f"this run has {world}: relaunch with that many")
        raise BadInput(f"{path} not found")
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def save_training_state(folder: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Each process writes its weight shards and its Adam state (moments and step, by parameter name)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    save_shards(folder, "unet", dict(model.named_parameters()), rank, world)
    optimizer = getattr(optimizer, "optimizer", optimizer)
    names = {p: n for n, p in model.named_parameters()}
    state = {}
    for p, s in optimizer.state.items():
        for k, v in s.items():
            state[f"{names[p]}::{k}"] = v.reshape(1) if v.dim() == 0 else v
    save_shards(folder, "optimizer", state, rank, world)


@torch.no_grad()
def load_training_state(folder: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Inverse of save_training_state, into this process's shards (the same number of processes)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    weights, _ = load_shards(folder, "unet", rank, world)
    for name, p in model.named_parameters():
        local(p).copy_(weights[name])
    saved, _ = load_shards(folder, "optimizer", rank, world)
    optimizer = getattr(optimizer, "optimizer", optimizer)
    by_name = dict(model.named_parameters())
    fused = any(group.get("fused") for group in optimizer.param_groups)
    packed = getattr(optimizer, "packs_moments", False)  # MaskedAdam: plain tensors of the mask's entries
    for key, value in saved.items():
        name, field = key.split("::")
        p = by_name[name]
        if field == "step":  # Adam keeps it on the CPU, fused Adam beside the weights
            optimizer.state[p][field] = value.reshape(()).to(local(p).device if fused else "cpu")
        else:
            optimizer.state[p][field] = value.to(local(p).device) if packed else _as_param_layout(value.to(local(p).device), p)


def _as_param_layout(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A moment read from a file, as torch.optim.Adam holds it on FSDP2 parameters: a DTensor like `p`.
    (MaskedAdam's packed moments stay plain tensors, even where every local entry is in the mask and
    the packed moment has the local shape.)"""
    if is_sharded(p) and value.shape == local(p).shape:
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return value
