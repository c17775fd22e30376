"""Run under `accelerate launch` with 2 processes: trained text encoders under a gradient scaler (what
fp16 training steps with), an inf injected into one process's gradient only. The gradients are averaged
as the training loop averages them (TrainedTextEncoders.average_gradients, before the scaler's step):
both processes must skip that step, then take the next one alike, their weights finite and equal."""

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).parent))
from erase.adversarial import TrainedTextEncoders

from conftest import build_tiny_pipeline


def main(out: str) -> None:
    state = PartialState(cpu=True, timeout=timedelta(seconds=20))
    pipe = build_tiny_pipeline()
    originals = {"text_encoder": dict(pipe.text_encoder.state_dict())}
    encoders = TrainedTextEncoders(pipe, torch.device("cpu"), originals)
    optimizer = encoders.attach(None, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    start = [p.detach().clone() for p in encoders.parameters()]
    record = []
    for step in range(2):
        cond = encoders.encode([f"a red handwritten digit {state.process_index + step}"])
        loss = cond.hidden_states.square().mean()
        scaler.scale(loss).backward()
        if step == 0 and state.process_index == 1:  # an overflow on this process alone
            next(iter(encoders.parameters())).grad.view(-1)[0] = float("inf")
        encoders.average_gradients()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        now = [p.detach() for p in encoders.parameters()]
        record.append({"moved": any(not torch.equal(a, b) for a, b in zip(start, now)),
                       "finite": all(bool(torch.isfinite(p).all()) for p in now), "scale": scaler.get_scale()})
    weights = torch.cat([p.detach().flatten() for p in encoders.parameters()])
    gathered = [None] * state.num_processes
    torch.distributed.all_gather_object(gathered, {"record": record, "weights": weights})
    if state.is_main_process:
        same = all(torch.equal(g["weights"], gathered[0]["weights"]) for g in gathered)
        with open(out, "w") as f:
            json.dump({"world": state.num_processes, "records": [g["record"] for g in gathered], "same_weights": same}, f)
    state.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
