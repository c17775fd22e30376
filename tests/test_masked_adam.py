"""erase/masked_adam.py: Adam's moments for the salient weights only, the same update to the bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from erase.masked_adam import MaskedAdam, optimizer_state_bytes
from erase.saliency import MaskedUpdate

from conftest import DEVICES
from test_train import run_train, small_run, weights


@pytest.mark.parametrize("device", DEVICES)
def test_masked_adam_equals_dense_masked_adam_to_the_bit(device: str) -> None:
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to(device)
    packed = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to(device)
    packed.load_state_dict(dense.state_dict())
    g = torch.Generator().manual_seed(1)
    mask = {n: (torch.rand(p.shape, generator=g) < 0.5).to(device) for n, p in dense.named_parameters()}
    mask["2.bias"] = torch.zeros_like(mask["2.bias"])  # a tensor with no salient weight: no state at all
    for n, p in dense.named_parameters():
        p.requires_grad_(bool(mask[n].any()))
    reference = torch.optim.Adam([p for p in dense.parameters() if p.requires_grad], lr=1e-2)
    update = MaskedUpdate(dense, {n: m for n, m in mask.items() if m.any()}).attach(reference)
    ours = MaskedAdam(packed, mask, lr=1e-2)
    before = {n: p.detach().clone() for n, p in packed.named_parameters()}
    for step in range(25):
        x = torch.randn(8, 16, generator=g).to(device)
        for model, opt in ((dense, reference), (packed, ours)):
            opt.zero_grad(set_to_none=True)
            model(x).pow(2).mean().backward()
            opt.step()
    update.remove()
    for (n, a), b in zip(dense.named_parameters(), packed.parameters(), strict=True):
        assert torch.equal(a, b), n
        assert torch.equal(b[~mask[n]], before[n][~mask[n]]), n  # mask==0 never written
    dense_bytes, ours_bytes = optimizer_state_bytes(reference), optimizer_state_bytes(ours)
    kept = sum(int(m.sum()) for m in mask.values())
    assert ours_bytes < 0.6 * dense_bytes and ours_bytes >= 8 * kept, (dense_bytes, ours_bytes)


def test_an_erasure_with_masked_state_equals_the_dense_one_and_holds_about_half(tiny_sd_path: Path, tmp_path: Path) -> None:
    """The same seeded SalUn run (ratio 0.5) with both optimizers: UNet weights bit-identical; the
    masked state is about half the dense one, as erase_config.json records."""
    records = {}
    for state in ("dense", "masked"):
        out = tmp_path / state
        proc = run_train(["--concept", "nudity", "--optimizer-state", state, *small_run(tiny_sd_path, out, tmp_path / "cache")])
        assert proc.returncode == 0, proc.stderr[-3000:]
        records[state] = json.loads((out / "erase_config.json").read_text())["optimizer"]
    a, b = weights(tmp_path / "dense", "unet"), weights(tmp_path / "masked", "unet")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ratio = records["masked"]["state_bytes"] / records["dense"]["state_bytes"]
    assert 0.45 < ratio < 0.6, records


def test_masked_adam_resumes_from_its_state_dict_to_the_bit(tmp_path: Path) -> None:
    """What a checkpoint holds (accelerate's save_state writes the optimizer's state_dict, safetensors
    here): 2 steps, saved, a fresh model and optimizer loaded, 2 more steps equal 4 uninterrupted steps;
    a checkpoint without the moments would restart Adam and differ."""
    from safetensors.torch import load_file, save_file

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        g = torch.Generator().manual_seed(1)
        return model, MaskedAdam(model, {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters()}, lr=1e-2)

    def steps(model, optimizer, first: int, last: int) -> None:
        for step in range(first, last):
            x = torch.randn(8, 8, generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad(set_to_none=True)
            model(x).pow(2).mean().backward()
            optimizer.step()

    whole, whole_opt = build()
    steps(whole, whole_opt, 0, 4)
    first, first_opt = build()
    steps(first, first_opt, 0, 2)
    state = first_opt.state_dict()
    flat = {f"{i}.{k}": v.reshape(1) if v.dim() == 0 else v for i, s in state["state"].items() for k, v in s.items()}
    save_file(flat, str(tmp_path / "optimizer.safetensors"))
    save_file({k: v.contiguous() for k, v in first.state_dict().items()}, str(tmp_path / "model.safetensors"))
    resumed, resumed_opt = build()
    resumed.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    saved = load_file(str(tmp_path / "optimizer.safetensors"))
    assert saved, "the checkpoint holds no optimizer state"
    by_index = {}
    for key, value in saved.items():
        index, name = key.split(".", 1)
        by_index.setdefault(int(index), {})[name] = value.reshape(()) if name == "step" else value
    resumed_opt.load_state_dict({"state": by_index, "param_groups": state["param_groups"]})
    steps(resumed, resumed_opt, 2, 4)
    for (n, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), n


def _model_and_mask(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to(dtype)
    g = torch.Generator().manual_seed(1)
    return model, {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in model.named_parameters()}


def _given_gradients(model, optimizer, grads: list[dict[str, torch.Tensor]]) -> None:
    for step in grads:
        for n, p in model.named_parameters():
            p.grad = step[n].to(p.dtype)
        optimizer.step()


def test_masked_masters_are_masked_adam_on_fp32_weights_and_fp32_copies_beside_bf16_ones() -> None:
    """fp32 weights: the same update to the bit, plus 4 bytes a salient weight. bf16 weights: the masters
    follow exactly the fp32 run that starts from the same (bf16) values under the same (bf16) gradients,
    the weights are the masters rounded to bf16 where the mask is 1 and untouched elsewhere; every state
    tensor is fp32."""
    g = torch.Generator().manual_seed(2)
    model, mask = _model_and_mask()
    grads = [{n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()} for _ in range(6)]
    plain, ours = _model_and_mask()[0], _model_and_mask()[0]
    plain_opt, ours_opt = MaskedAdam(plain, mask, lr=1e-2), MaskedAdam(ours, mask, lr=1e-2, masters=True)
    _given_gradients(plain, plain_opt, grads)
    _given_gradients(ours, ours_opt, grads)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), ours.parameters(), strict=True))
    kept = sum(int(m.sum()) for m in mask.values())
    assert optimizer_state_bytes(ours_opt) - optimizer_state_bytes(plain_opt) == 4 * kept

    low, _ = _model_and_mask(torch.bfloat16)
    start = {n: p.detach().clone() for n, p in low.named_parameters()}
    reference = _model_and_mask()[0]
    reference.load_state_dict({n: p.float() for n, p in start.items()})
    low_opt, ref_opt = MaskedAdam(low, mask, lr=1e-2, masters=True), MaskedAdam(reference, mask, lr=1e-2)
    bf16_grads = [{n: t.to(torch.bfloat16) for n, t in step.items()} for step in grads]
    _given_gradients(low, low_opt, bf16_grads)
    _given_gradients(reference, ref_opt, [{n: t.float() for n, t in step.items()} for step in bf16_grads])
    named_ref = dict(reference.named_parameters())
    for n, p in low.named_parameters():
        m = mask[n]
        assert p.dtype == torch.bfloat16 and torch.equal(p[~m], start[n][~m]), n
        master = low_opt.state[p]["master"]
        assert master.dtype == torch.float32 and torch.equal(master, named_ref[n].detach()[m]), n
        assert torch.equal(p[m], master.to(torch.bfloat16)), n
        assert all(t.dtype == torch.float32 for k, t in low_opt.state[p].items() if k != "step"), n
    assert optimizer_state_bytes(low_opt) == optimizer_state_bytes(ours_opt)  # state is fp32 whatever the weights


def test_masked_masters_resume_in_fp32_beside_bf16_weights() -> None:
    """torch's Optimizer.load_state_dict casts state to the weights' dtype: MaskedAdam keeps it fp32."""
    model, mask = _model_and_mask(torch.bfloat16)
    optimizer = MaskedAdam(model, mask, lr=1e-2, masters=True)
    g = torch.Generator().manual_seed(3)
    _given_gradients(model, optimizer, [{n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}])
    state = optimizer.state_dict()
    fresh = MaskedAdam(model, mask, lr=1e-2, masters=True)
    fresh.load_state_dict(state)
    for p in model.parameters():
        for key, t in fresh.state[p].items():
            assert key == "step" or (t.dtype == torch.float32 and torch.equal(t, optimizer.state[p][key])), key


def test_the_saliency_sums_of_bf16_weights_are_summed_in_fp32() -> None:
    """Weight a's gradient is 256 in one batch and 0.5 in each of 100 more (306 in all); b's is 300 once.
    Summed in bf16 (spacing 2 at 256), a's sum stays 256 and the mask keeps b; summed in fp32 it keeps a."""
    from erase.saliency import compute_saliency_mask

    layer = torch.nn.Linear(2, 1, bias=False).to(torch.bfloat16)
    batches = [torch.tensor([256.0, 300.0])] + [torch.tensor([0.5, 0.0])] * 100
    mask = compute_saliency_mask(layer, lambda model, c: (model.weight[0] * c.to(torch.bfloat16)).sum(), batches, ratio=0.5,
                                 show_progress=False)
    assert mask["weight"].tolist() == [[True, False]]
    assert layer.weight.grad is None
