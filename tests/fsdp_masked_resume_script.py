"""Run under `accelerate launch` with 2 processes: MaskedAdam on FSDP2-sharded parameters, saved after
2 steps and resumed by a fresh model and optimizer, against the uninterrupted 4 steps. The mask keeps
every entry of some tensors (rl's mask, and a 1-D bias whose local rows are all in the mask: the packed
moment then has the local shape) and part of others (salun's)."""

import json
import sys
import tempfile

import torch
from accelerate import PartialState
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from erase.masked_adam import MaskedAdam
from erase.sharding import load_training_state, local, local_mask, save_training_state


def build(mesh) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def steps(model, optimizer, first: int, last: int) -> None:
    for step in range(first, last):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=g)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main(out: str) -> None:
    state = PartialState(cpu=True)
    mesh = init_device_mesh("cpu", (state.num_processes,))
    found = {mode: resume(state, mesh, mode) for mode in ("rl", "salun")}
    if state.is_main_process:
        with open(out, "w") as f:
            json.dump({"world": state.num_processes, "modes": found}, f)
    state.wait_for_everyone()
    torch.distributed.destroy_process_group()


def resume(state, mesh, mode: str) -> dict:
    g = torch.Generator().manual_seed(1)
    shapes = {"0.weight": (6, 4), "0.bias": (6,), "2.weight": (3, 6), "2.bias": (3,)}
    if mode == "rl":
        whole = {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
    else:  # salun-like: half the weights, one bias whole
        whole = {n: torch.rand(s, generator=g) < 0.5 for n, s in shapes.items()}
        whole["0.bias"][:] = True
    folder = tempfile.mkdtemp() if state.is_main_process else None
    holder = [folder]
    torch.distributed.broadcast_object_list(holder)
    folder = holder[0]

    model = build(mesh)
    optimizer = MaskedAdam(model, local_mask(whole, model), lr=1e-2, sharded=True)
    steps(model, optimizer, 0, 2)
    save_training_state(folder, model, optimizer)
    steps(model, optimizer, 2, 4)
    full = {n: local(p).detach().clone() for n, p in model.named_parameters()}

    resumed = build(mesh)
    optimizer = MaskedAdam(resumed, local_mask(whole, resumed), lr=1e-2, sharded=True)
    load_training_state(folder, resumed, optimizer)
    steps(resumed, optimizer, 2, 4)
    equal = all(torch.equal(full[n], local(p)) for n, p in resumed.named_parameters())
    moved = any(not torch.equal(full[n], local(p)) for n, p in build(mesh).named_parameters())
    flags = [None] * state.num_processes
    torch.distributed.all_gather_object(flags, [equal, moved])
    return {"equal": [f[0] for f in flags], "moved": [f[1] for f in flags]}


if __name__ == "__main__":
    main(sys.argv[1])
