"""Run under `accelerate launch`: the saliency mask of a seeded model, data sharded over processes."""

import json
import sys

import torch
from accelerate import Accelerator

from erase.saliency import compute_saliency_mask, save_mask


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    # one batch of 4 per process with 2 processes; both batches in order with 1 process
    n = accelerator.num_processes
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 8, 4)][accelerator.process_index :: n]

    def loss_fn(m, batch):
        return -torch.nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="sum")

    mask = compute_saliency_mask(model, loss_fn, batches, ratio=0.3, show_progress=False)
    if accelerator.is_main_process:
        save_mask(mask, out)
        with open(out + ".json", "w") as f:
            json.dump({"num_processes": n}, f)
    accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():  # an orderly teardown: gloo may abort at interpreter exit otherwise
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
