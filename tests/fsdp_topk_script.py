"""Run under `accelerate launch` with 2 processes: the sharded global top-k (each process holding
its dim-0 rows of every score tensor, as FSDP shards them) against one process's mask of the whole
tensors, on scores full of ties and on shards that are uneven or empty."""

import json
import sys

import torch
from accelerate import PartialState

from erase.saliency import global_topk_mask, mask_fraction
from erase.sharding import moving_tensors


def main(out: str) -> None:
    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (7, 3), "b": (1, 5), "c": (4,), "d": (33, 2, 2), "e": (2, 9)}
    # few distinct values: most of the threshold's value are ties that straddle the processes
    scores = {n: torch.randint(0, 4, s, generator=g).float() for n, s in shapes.items()}
    scores["e"].zero_()  # a tensor with nothing to keep
    results = {}
    for ratio in (0.1, 0.37, 0.5, 0.9, 1.0):
        whole = global_topk_mask(scores, ratio)
        parts = {n: (c[rank] if rank < len(c := torch.chunk(s, world)) else s[:0]) for n, s in scores.items()}
        mine = global_topk_mask(parts, ratio, sharded=True)
        gathered = {}
        for n, m in mine.items():
            pieces = [None] * world
            torch.distributed.all_gather_object(pieces, m)
            gathered[n] = torch.cat([p.reshape(-1, *shapes[n][1:]) for p in pieces])
        results[str(ratio)] = {
            "bits_differ": sum(int((gathered[n] != whole[n]).sum()) for n in shapes),
            "fraction": [mask_fraction(mine, sharded=True), mask_fraction(whole)],
            "moving": [sorted(moving_tensors(mine, sharded=True)), sorted(moving_tensors(whole))],
        }
    if state.is_main_process:
        with open(out, "w") as f:
            json.dump({"world": world, "results": results}, f)
    state.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
