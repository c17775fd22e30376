from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erase.classifier import (
    UnlearnConfig,
    evaluate,
    load_dataset,
    parse_forget,
    random_wrong_labels,
    saliency_mask,
    train,
    train_original,
    unlearn,
)


@pytest.fixture(scope="module")
def original(digits):
    torch.set_num_threads(1)
    return train_original(digits, UnlearnConfig(method="ft", train_epochs=4))


def test_forget_specs(digits) -> None:
    idx = parse_forget("random:0.1", digits.train_y, seed=0)
    assert len(idx) == round(0.1 * len(digits.train_y)) and len(set(idx.tolist())) == len(idx)
    assert torch.equal(idx, parse_forget("random:0.1", digits.train_y, seed=0))
    assert (digits.train_y[parse_forget("class:3", digits.train_y)] == 3).all()
    for bad in ["random:1.5", "random:x", "class:12", "everything", "indices:/does/not/exist.json"]:
        with pytest.raises(ValueError, match="cannot parse forget set"):
            parse_forget(bad, digits.train_y)


def test_random_wrong_labels_are_always_wrong() -> None:
    y = torch.arange(10).repeat(50)
    wrong = random_wrong_labels(y, 10, seed=0)
    assert (wrong != y).all() and len(set(wrong.tolist())) == 10


def test_label_noise_flips_a_seeded_fraction_of_training_labels(digits) -> None:
    noisy = load_dataset("digits", seed=0, label_noise=0.1)
    flipped = noisy.mislabeled
    assert len(flipped) == round(0.1 * len(digits.train_y)) and len(digits.mislabeled) == 0
    changed = torch.nonzero(noisy.train_y != digits.train_y).flatten()
    assert torch.equal(changed, flipped)  # every flipped label is wrong, nothing else changed
    assert torch.equal(noisy.test_y, digits.test_y) and torch.equal(noisy.train_x, digits.train_x)
    assert torch.equal(load_dataset("digits", seed=0, label_noise=0.1).train_y, noisy.train_y)
    assert not torch.equal(load_dataset("digits", seed=1, label_noise=0.1).mislabeled, flipped)
    # drawn independently of the random forget set of the same seed (which would be the same 10%)
    overlap = torch.isin(parse_forget("random:0.1", noisy.train_y, seed=0), flipped).float().mean()
    assert overlap < 0.3
    with pytest.raises(ValueError, match="label_noise"):
        load_dataset("digits", label_noise=1.0)


def test_original_model_learns_digits(digits, original) -> None:
    metrics = evaluate(original, digits, parse_forget("random:0.1", digits.train_y))
    assert metrics["TA"] > 90 and metrics["RA"] > 90
    assert set(metrics) == {"UA", "RA", "TA", "MIA"} and all(0 <= v <= 100 for v in metrics.values())


def test_salun_updates_only_salient_weights(digits, original) -> None:
    import copy

    forget_idx = parse_forget("random:0.1", digits.train_y)
    model = copy.deepcopy(original)
    mask = saliency_mask(model, digits.train_x[forget_idx], digits.train_y[forget_idx], 0.3, 64, "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, digits.train_x[:256], digits.train_y[:256], epochs=1, lr=0.05, mask=mask)
    for n, p in model.named_parameters():
        assert torch.equal(p[~mask[n]], before[n][~mask[n]]), n
    moved = sum(int((p != before[n]).sum()) for n, p in model.named_parameters())
    assert moved > 0.9 * sum(int(m.sum()) for m in mask.values())


def test_unlearning_methods_forget_the_forget_set(digits, original) -> None:
    forget = "class:3"  # class-wise forgetting: a clear target, UA should approach 100
    forget_idx = parse_forget(forget, digits.train_y)
    ua = {}
    for method in ["ga", "rl", "salun"]:
        cfg = UnlearnConfig(method=method, forget=forget, epochs=2, lr={"ga": 0.01}.get(method, 0.05))
        ua[method] = evaluate(unlearn(original, digits, forget_idx, cfg), digits, forget_idx)["UA"]
    base = evaluate(original, digits, forget_idx)["UA"]
    assert all(v > base + 50 for v in ua.values()), (base, ua)


def run_cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "erase.classifier", *args, "--out", str(tmp_path / "r.json")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mask-ratio", "0"], "mask ratio must be in (0, 1]"),
        (["--mask-ratio", "1.5"], "mask ratio must be in (0, 1]"),
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--method", "magic"], "unknown method 'magic'"),
        (["--forget", "half"], "cannot parse forget set 'half'"),
        (["--label-noise", "1"], "label_noise must be in [0, 1)"),
    ],
)
def test_cli_bad_input_one_line_and_no_output(args: list[str], message: str, tmp_path: Path) -> None:
    proc = run_cli(*args, tmp_path=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not any(tmp_path.iterdir())


def test_cli_cifar10_offline_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_cli("--dataset", "cifar10", tmp_path=tmp_path)
    assert proc.returncode != 0 and "cifar10" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cli_writes_report(tmp_path: Path) -> None:
    proc = run_cli("--method", "salun", "--train-epochs", "2", "--epochs", "1", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["method"] == "salun" and report["forget_size"] == 144 and report["forget_mislabeled"] == 0
    assert set(report["metrics"]) == {"UA", "RA", "TA", "MIA"}
    assert "salun: UA" in proc.stdout
