from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erase import MaskedUpdate, compute_saliency_mask, global_topk_mask, load_mask, save_mask
from erase.saliency import pack_bits, select_parameters, unpack_bits

from conftest import DEVICES, free_port

ROOT = Path(__file__).resolve().parents[1]


def brute_force_mask(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Reference: a stable sort of every score, largest first; ties go to the earlier position."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = round(ratio * flat.numel())
    order = torch.sort(-flat, stable=True).indices[:k]
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order] = True
    out, i = {}, 0
    for name, s in scores.items():
        out[name] = keep[i : i + s.numel()].view(s.shape)
        i += s.numel()
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ratio", [0.5, 0.1, 0.333, 1.0])
@pytest.mark.parametrize("with_ties", [False, True])
def test_global_threshold_equals_brute_force_sort(ratio: float, with_ties: bool, device: str) -> None:
    g = torch.Generator().manual_seed(1)
    shapes = {"a.weight": (17, 9), "a.bias": (17,), "b.weight": (3, 5, 7), "c": (1,)}
    scores = {}
    for name, shape in shapes.items():
        s = torch.rand(shape, generator=g)
        if with_ties:
            s = (s * 6).floor()  # only 6 distinct values: many ties at any threshold
        scores[name] = s
    mask = global_topk_mask({n: s.to(device) for n, s in scores.items()}, ratio)
    expected = brute_force_mask(scores, ratio)
    total = sum(s.numel() for s in scores.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(ratio * total)
    for name in scores:
        assert mask[name].device.type == device
        assert torch.equal(mask[name].cpu(), expected[name]), name


def test_threshold_is_global_not_per_layer() -> None:
    scores = {"small": torch.full((10,), 0.1), "large": torch.full((10,), 5.0)}
    mask = global_topk_mask(scores, 0.5)
    assert not mask["small"].any() and mask["large"].all()


@pytest.mark.parametrize("ratio", [0, 1.5, -0.1])
def test_bad_ratio_raises(ratio: float) -> None:
    with pytest.raises(ValueError, match="ratio"):
        global_topk_mask({"a": torch.rand(4)}, ratio)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_absolute_value_is_taken_after_summing() -> None:
    """Two batches whose weight gradients cancel: summed first, only the bias is salient.

    With |.| taken per batch instead, weight[1] (|2| + |-2| = 4) would beat the bias (2).
    """
    model = torch.nn.Linear(2, 1)
    batches = [torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, -2.0]])]  # d out / d weight = x
    mask = compute_saliency_mask(model, lambda m, b: m(b).sum(), batches, ratio=1 / 3, show_progress=False)
    assert mask["bias"].all() and not mask["weight"].any()


def test_compute_mask_selects_modules_and_restores_model() -> None:
    model = tiny_model()
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    mask = compute_saliency_mask(model, loss_fn, batches, ratio=0.25, target_modules=["2"], show_progress=False)
    assert sorted(mask) == ["2.bias", "2.weight"]
    assert sum(int(m.sum()) for m in mask.values()) == round(0.25 * (8 * 3 + 3))
    assert all(p.grad is None for p in model.parameters())
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad

    # the mask equals a brute-force top-k of |sum of gradients|
    model.zero_grad()
    for b in batches:
        loss_fn(model, b).backward()
    ref = brute_force_mask({n: model.get_parameter(n).grad.abs() for n in ["2.weight", "2.bias"]}, 0.25)
    assert all(torch.equal(mask[n], ref[n]) for n in ref)


def test_select_parameters_by_name_suffix_module_and_regex() -> None:
    model = torch.nn.ModuleDict({"down": torch.nn.ModuleDict({"attn2": torch.nn.Linear(2, 2), "ff": torch.nn.Linear(2, 2)})})
    names = lambda sel: sorted(n for n, _ in sel)
    assert names(select_parameters(model, ["down.attn2.weight"])) == ["down.attn2.weight"]
    assert names(select_parameters(model, ["attn2.bias"])) == ["down.attn2.bias"]
    assert names(select_parameters(model, ["attn2"])) == ["down.attn2.bias", "down.attn2.weight"]
    assert names(select_parameters(model, r"ff\.weight$")) == ["down.ff.weight"]
    with pytest.raises(ValueError, match="matched no trainable parameter"):
        select_parameters(model, ["attn1"])
    with pytest.raises(ValueError, match="matched no trainable parameter"):
        select_parameters(model, ["ttn2"])  # a partial word is not a module name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000, 12345])
def test_pack_bits_matches_numpy_and_round_trips(numel: int, device: str) -> None:
    import numpy as np

    g = torch.Generator().manual_seed(numel)
    mask = torch.rand(numel, generator=g) < 0.5
    packed = pack_bits(mask.to(device))
    assert packed.device.type == device and packed.dtype == torch.uint8
    assert np.array_equal(packed.cpu().numpy(), np.packbits(mask.numpy()))  # the on-disk format
    shape = (numel,) if numel % 3 else (3, numel // 3)
    assert torch.equal(unpack_bits(packed, shape).cpu(), mask.view(shape))


@pytest.mark.parametrize("device", DEVICES)
def test_save_load_round_trip_and_bit_packing(tmp_path: Path, device: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(100, 200), torch.nn.Linear(200, 50))
    scores = {n: torch.rand_like(p).to(device) for n, p in model.named_parameters()}
    mask = global_topk_mask(scores, 0.5)
    path = tmp_path / "mask.safetensors"
    save_mask(mask, path, metadata={"model": "tiny"})
    n_params = sum(p.numel() for p in model.parameters())
    assert os.path.getsize(path) <= n_params / 8 + 2048  # 1 bit per weight plus a small header
    loaded = load_mask(path, model)
    assert list(loaded) == list(mask)
    assert all(torch.equal(loaded[n], mask[n].cpu()) and loaded[n].dtype == torch.bool for n in mask)
    assert [p.name for p in tmp_path.iterdir()] == ["mask.safetensors"]  # no temporary file left


def test_load_mask_for_another_model_raises(tmp_path: Path) -> None:
    path = tmp_path / "mask.safetensors"
    save_mask({n: torch.ones_like(p, dtype=torch.bool) for n, p in tiny_model().named_parameters()}, path)
    other_shape = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 3))
    with pytest.raises(ValueError, match=r"does not fit this model: '0.weight' has shape \(8, 6\)"):
        load_mask(path, other_shape)
    with pytest.raises(ValueError, match="names not in the model"):
        load_mask(path, torch.nn.Linear(6, 8))
    bogus = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(bogus))
    with pytest.raises(ValueError, match="not a saliency mask"):
        load_mask(bogus)


OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),  # what train.py uses on CUDA
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.5),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_masked_out_weights_stay_bit_identical(opt_name: str, device: str) -> None:
    model = tiny_model().to(device)
    g = torch.Generator().manual_seed(3)
    mask = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters()}  # on the CPU: moved by MaskedUpdate
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = OPTIMIZERS[opt_name](model.parameters())
    update = MaskedUpdate(model, mask).attach(optimizer)
    assert update.restores == (opt_name in {"sgd-momentum-wd", "adam-l2", "adamw"})  # weight decay
    for step in range(20):
        x, y = torch.randn(16, 6, generator=g).to(device), torch.randint(0, 3, (16,), generator=g).to(device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    update.remove()
    for n, p in model.named_parameters():
        m = mask[n].to(device)
        assert torch.equal(p.detach()[~m], before[n][~m]), f"{n} masked-out weights moved"
        assert (p.detach()[m] != before[n][m]).float().mean() > 0.9, f"{n} salient weights did not train"


def test_without_masked_update_weight_decay_moves_masked_weights() -> None:
    """The failure mode MaskedUpdate exists for: masking gradients alone lets AdamW decay move weights."""
    model = tiny_model()
    mask = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.5)
    loss = model(torch.randn(4, 6)).sum()
    loss.backward()
    for p, (n, m) in zip(model.parameters(), mask.items()):
        p.grad.masked_fill_(~m, 0)
    optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_two_process_mask_equals_one_process(tmp_path: Path) -> None:
    script = ROOT / "tests" / "dist_mask_script.py"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    runs = {
        1: launch + ["--num_processes", "1"],
        2: launch + ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())],
    }
    masks = {}
    for n, cmd in runs.items():
        out = tmp_path / f"mask{n}.safetensors"
        proc = subprocess.run(cmd + [str(script), str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(Path(str(out) + ".json").read_text())["num_processes"] == n
        masks[n] = load_mask(out)
    assert list(masks[1]) == list(masks[2])
    assert all(torch.equal(masks[1][k], masks[2][k]) for k in masks[1])


class _TwoScales(torch.nn.Module):
    """y = W x, every output 1 above its target, and the first half of x's features 1000 times larger
    than the second: |grad W| puts every weight of the first 32 columns above every weight of the last 32."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(64, 64, bias=False)
        self.x = torch.cat([torch.ones(8, 32), torch.full((8, 32), 1e-3)], dim=1)
        with torch.no_grad():
            self.target = self.fc(self.x) - 1


def _tiny_loss(model: _TwoScales, batch) -> torch.Tensor:
    # 1e-6: the activations' gradient (~4e-9 per element) is below fp16's smallest subnormal (6e-8)
    return torch.nn.functional.mse_loss(model.fc(model.x).float(), model.target) * 1e-6


def _mask_of(model: _TwoScales, autocast: torch.dtype | None, loss_scale: float) -> torch.Tensor:
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        return compute_saliency_mask(model, _tiny_loss, [0, 1], 0.5, show_progress=False, loss_scale=loss_scale)["fc.weight"]


def test_fp16_saliency_with_a_loss_scale_equals_fp32(caplog) -> None:
    """Under fp16 autocast (it runs on the CPU) the unscaled gradients underflow to zero and the mask is
    ties broken by position; with the loss scale the mask is the fp32 one (the first 32 columns), and an
    overflowing scale is halved until the gradients are finite."""
    model = _TwoScales()
    fp32 = _mask_of(model, None, 1.0)
    assert fp32[:, :32].all() and not fp32[:, 32:].any()
    assert not torch.equal(_mask_of(model, torch.float16, 1.0), fp32)  # the case underflows without scaling
    assert torch.equal(_mask_of(model, torch.float16, 2.0**16), fp32)
    assert "overflowed" not in caplog.text
    assert torch.equal(_mask_of(model, torch.float16, 2.0**50), fp32)  # overflows in fp16 at first
    assert "overflowed" in caplog.text
