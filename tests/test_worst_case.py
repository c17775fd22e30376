from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from erase.classifier import UnlearnConfig, load_dataset, parse_forget, train_original
from erase.worst_case import (
    ClassifierProblem,
    LowerOptions,
    SearchOptions,
    WorstCaseConfig,
    build_prompt_problem,
    classifier_problem,
    forget_indices,
    implicit_term,
    main,
    project_capped_simplex,
    random_start,
    resolve_size,
    run_prompt,
    search,
    top_m,
)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- projection


def brute_force_projection(a: torch.Tensor, m: float) -> torch.Tensor:
    """The exact projection by another route: sum(clamp(a - mu, 0, 1)) is piecewise linear in mu
    with breakpoints at a_i and a_i - 1; find the segment holding m and solve it linearly."""
    a = a.double()
    points = sorted(set(torch.cat([a, a - 1]).tolist()))
    total = [float((a - mu).clamp(0, 1).sum()) for mu in points]
    for (mu0, s0), (mu1, s1) in zip(zip(points, total), zip(points[1:], total[1:])):
        if s1 <= m <= s0:
            mu = mu0 if s0 == s1 else mu0 + (s0 - m) * (mu1 - mu0) / (s0 - s1)
            return (a - mu).clamp(0, 1)
    raise AssertionError("m outside the range of the sum")


@pytest.mark.parametrize("m", [0.5, 1, 2.5, 4, 6.99])
def test_projection_equals_brute_force(m: float) -> None:
    g = torch.Generator().manual_seed(int(m * 100))
    for scale in (0.3, 1.0, 5.0):
        a = torch.randn(7, generator=g, dtype=torch.float64) * scale
        w = project_capped_simplex(a, m)
        assert abs(float(w.sum()) - m) < 1e-6
        assert float(w.min()) >= 0 and float(w.max()) <= 1
        assert torch.allclose(w, brute_force_projection(a, m), atol=1e-6)


def test_projection_known_cases() -> None:
    inside = torch.tensor([0.2, 0.5, 0.3, 1.0], dtype=torch.float64)  # already feasible for m = 2
    assert torch.allclose(project_capped_simplex(inside, 2.0), inside, atol=1e-8)
    assert torch.allclose(project_capped_simplex(torch.full((5,), 3.0), 2), torch.full((5,), 0.4), atol=1e-8)
    shifted = project_capped_simplex(inside + 17.0, 2.0)  # a constant shift does not matter
    assert torch.allclose(shifted, inside, atol=1e-7)
    assert torch.equal(project_capped_simplex(torch.tensor([9.0, -3.0, 0.1]), 1), torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="must lie in"):
        project_capped_simplex(torch.zeros(3), 4)


def test_top_m_and_size() -> None:
    assert top_m(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2).tolist() == [1, 3]
    assert resolve_size("0.1", 1437) == 144 and resolve_size("4", 40) == 4 and resolve_size(3, 10) == 3
    for bad in ("0", "1.5", "-2", "40", "x", "0.001"):
        with pytest.raises(ValueError, match="--size"):
            resolve_size(bad, 40)


# ----------------------------------------------------------------------------- the solver


class FixedLosses:
    """A problem whose forget losses do not depend on w: the optimum is the m smallest losses."""

    def __init__(self, losses: torch.Tensor):
        self.losses, self.num_items = losses.double(), len(losses)

    def lower(self, w):
        return nn.Identity()

    def item_losses(self, model):
        return self.losses


def test_normalised_step_moves_w_where_the_reference_step_does_not() -> None:
    n, m = 50, 5
    losses = 1e-3 * torch.rand(n, generator=torch.Generator().manual_seed(0))  # a trained model's small losses
    start = random_start(n, m, seed=1)
    result = search(FixedLosses(losses), m, SearchOptions(outer_steps=15, show_progress=False), start)
    assert result.start == top_m(start, m).tolist()
    assert result.selected == top_m(-losses, m).tolist()  # converged to the m lowest losses
    assert set(result.selected) != set(result.start)
    assert result.history[-1]["upper_objective"] < result.history[0]["upper_objective"]
    # the reference code's raw step w - w_lr * g (w_lr = 1e-2 there) leaves the top m where it started
    raw = project_capped_simplex(start - 1e-2 * (losses + 2e-4 * start), m)
    assert top_m(raw, m).tolist() == result.start


@pytest.fixture(scope="module")
def original(digits):
    torch.set_num_threads(1)
    return train_original(digits, UnlearnConfig(method="retrain", train_epochs=3))


def small(target: str = "data", **kw) -> WorstCaseConfig:
    base = dict(target=target, method="rl", outer_steps=10, inner_steps=4, train_epochs=3)
    return WorstCaseConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["rl", "salun"])
def test_data_search_moves_to_samples_the_unlearned_model_still_fits(digits, original, method) -> None:
    cfg = small(method=method)
    problem = classifier_problem(cfg, digits, original)
    m = resolve_size(cfg.size, problem.num_items)
    result = search(problem, m, cfg.search_options(show_progress=False), random_start(problem.num_items, m, 0))
    assert result.start == parse_forget("random:0.1", digits.train_y, seed=0).tolist()  # starts at the random set
    assert len(result.selected) == m and len(set(result.selected)) == m
    assert len(set(result.selected) & set(result.start)) < 0.7 * m  # w moved
    w = torch.tensor(result.w, dtype=torch.float64)
    assert abs(float(w.sum()) - m) < 1e-3 and float(w.min()) >= 0 and float(w.max()) <= 1
    hist = result.history
    assert hist[-1]["selected_forget_loss"] < hist[0]["selected_forget_loss"]
    assert hist[-1]["upper_objective"] < hist[0]["upper_objective"]


def test_ft_search_on_flipped_labels_leaves_the_mislabeled_samples_out() -> None:
    """What FT can forget is what only memorisation fits: the worst case for FT avoids it."""
    torch.set_num_threads(1)
    noisy = load_dataset("digits", seed=0, label_noise=0.1)
    cfg = small(method="ft", label_noise=0.1)
    problem = classifier_problem(cfg, noisy, train_original(noisy, UnlearnConfig(method="retrain", train_epochs=3)))
    m = resolve_size(cfg.size, problem.num_items)
    result = search(problem, m, cfg.search_options(show_progress=False), random_start(problem.num_items, m, 0))
    mislabeled = [int(torch.isin(torch.tensor(s), noisy.mislabeled).sum()) for s in (result.start, result.selected)]
    assert mislabeled[0] >= 5 and mislabeled[1] <= mislabeled[0] // 3, mislabeled


def test_unrolled_implicit_term_matches_autograd() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(12, 1, 2, 2), torch.randint(0, 3, (12,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    y_wrong = (y + 1) % 3
    problem = ClassifierProblem(model, x.double(), y, torch.arange(12), 12, y_wrong, LowerOptions(method="rl"))
    w = torch.rand(12, dtype=torch.float64)
    opts = SearchOptions(hypergradient="unrolled", unroll_lr=0.1, fd_step=1e-4, show_progress=False)
    got = implicit_term(problem, model, w, opts)
    # exact: -eta * <grad_theta F, grad_theta (forget_i - retain_i) / N>
    params = list(model.parameters())
    logits = model(x.double())
    ce = nn.functional.cross_entropy(logits, y, reduction="none")
    v = torch.autograd.grad((w * ce).sum(), params)
    want = []
    for i in range(12):
        loss = lambda labels: nn.functional.cross_entropy(model(x[i : i + 1].double()), labels[i : i + 1])
        h = (loss(y_wrong) - loss(y)) / 12
        grads = torch.autograd.grad(h, params)
        want.append(-0.1 * sum((a * b).sum() for a, b in zip(v, grads)))
    assert torch.allclose(got, torch.stack(want), rtol=1e-4, atol=1e-9)


def test_class_target_selects_whole_classes(digits, original) -> None:
    cfg = small(target="class", size="2", method="ft")
    problem = classifier_problem(cfg, digits, original)
    assert problem.num_items == 10
    result = search(problem, 2, cfg.search_options(show_progress=False), random_start(10, 2, 0))
    idx = forget_indices(cfg, result.selected, digits.train_y)
    assert set(digits.train_y[idx].tolist()) == set(result.selected)
    assert len(idx) == int(torch.isin(digits.train_y, torch.tensor(result.selected)).sum())


def test_cli_writes_a_valid_indices_file_for_the_classifier(tmp_path, digits) -> None:
    from erase.classifier.__main__ import main as classifier_main

    torch.set_num_threads(1)
    out, report = tmp_path / "forget.json", tmp_path / "report.json"
    argv = ["--target", "data", "--dataset", "digits", "--size", "0.05", "--method", "ft", "--outer-steps", "2",
            "--inner-steps", "2", "--train-epochs", "1", "--out", str(out), "--report", str(report)]
    assert main(argv) == 0
    indices = json.loads(out.read_text())
    assert indices == sorted(indices) and len(indices) == round(0.05 * len(digits.train_y))
    assert parse_forget(f"indices:{out}", digits.train_y).tolist() == indices
    details = json.loads(report.read_text())
    assert details["indices"] == indices and len(details["history"]) == 2 and details["size"] == len(indices)
    result = tmp_path / "unlearn.json"
    argv = ["--dataset", "digits", "--forget", f"indices:{out}", "--method", "ft", "--epochs", "1", "--train-epochs", "1",
            "--out", str(result)]
    assert classifier_main(argv) == 0
    assert json.loads(result.read_text())["forget_size"] == len(indices)


def test_module_entry_point_fails_cleanly(tmp_path) -> None:
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "erase.worst_case", "--target", "data", "--size", "2.5", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "--size" in done.stderr and not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target", "everything"], "unknown target"),
        (["--size", "1.5"], "--size"),
        (["--target", "data", "--method", "esd-x"], "does not apply"),
        (["--target", "prompt", "--method", "ft"], "does not apply"),
        (["--hypergradient", "exact"], "unknown hypergradient"),
        (["--outer-steps", "x"], "invalid int value"),
        (["--inner-lr", "0"], "inner_lr"),
        (["--label-noise", "-0.1"], "label_noise"),
        (["--target", "prompt", "--prompt-loss", "clip"], "prompt_loss"),
        (["--target", "prompt", "--prompts", "/does/not/exist.json"], "cannot read candidate prompts"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, message) -> None:
    out = tmp_path / "out.json"
    try:
        code = main(argv + ["--out", str(out)])
    except SystemExit as exit_:  # argparse's own checks
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


# ----------------------------------------------------------------------------- prompt target


CANDIDATES = [
    ["a red handwritten digit seven", "a red handwritten digit eight"],
    ["a blue handwritten digit one", "a blue handwritten digit two"],
    ["a green handwritten digit three", "a green handwritten digit four"],
    ["a white handwritten digit five", "a white handwritten digit six"],
]


@pytest.fixture(scope="module")
def tiny_prompt_cfg(tiny_sd_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("worst-prompts")
    prompts = folder / "candidates.json"
    prompts.write_text(json.dumps(CANDIDATES))
    return dict(target="prompt", model=str(tiny_sd_path), prompts=str(prompts), size="2", images_per_prompt=2,
                generation_steps=2, guidance_scale=2.0, outer_steps=3, inner_steps=2, batch_size=4, inner_lr=1e-3,
                cache_dir=str(folder / "cache"))


def test_prompt_search_on_a_tiny_pipeline(tiny_prompt_cfg) -> None:
    torch.set_num_threads(1)
    report = run_prompt(WorstCaseConfig(**tiny_prompt_cfg), show_progress=False)
    names = [p for p, _ in CANDIDATES]
    assert report["size"] == 2 and report["candidates"] == 4 and len(report["prompts"]) == 2
    assert set(report["prompts"]) <= set(names) and report["prompts"] == [names[i] for i in report["selected"]]
    w = torch.tensor(report["w"])
    assert abs(float(w.sum()) - 2) < 1e-4 and float(w.min()) >= 0 and float(w.max()) <= 1
    assert len(report["history"]) == 3 and all(torch.isfinite(torch.tensor(h["upper_objective"])) for h in report["history"])


def test_prompt_search_leaves_a_bad_start(tiny_prompt_cfg) -> None:
    from erase.sd import load_pipeline

    torch.set_num_threads(1)
    cfg = WorstCaseConfig(**tiny_prompt_cfg)
    problem = build_prompt_problem(cfg, load_pipeline(cfg.model), [p for p, _ in CANDIDATES], [a for _, a in CANDIDATES])
    losses = problem.item_losses(problem.lower(torch.full((4,), 0.5, dtype=torch.float64)))
    start = torch.zeros(4, dtype=torch.float64)
    start[top_m(losses, 2)] = 1  # the two prompts the unlearned model fits worst: the easiest to forget
    result = search(problem, 2, SearchOptions(outer_steps=4, w_lr=0.5, show_progress=False), start)
    assert result.start == top_m(losses, 2).tolist() and set(result.selected) != set(result.start)


@pytest.mark.parametrize("method, prompt_loss", [("salun", "denoising"), ("esd-x", "contrast")])
def test_prompt_lower_level_respects_the_method(tiny_prompt_cfg, method, prompt_loss) -> None:
    from erase.sd import load_pipeline

    torch.set_num_threads(1)
    cfg = WorstCaseConfig(**{**tiny_prompt_cfg, "method": method, "mask_ratio": 0.3, "prompt_loss": prompt_loss})
    pipe = load_pipeline(cfg.model)
    problem = build_prompt_problem(cfg, pipe, [p for p, _ in CANDIDATES], [a for _, a in CANDIDATES])
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    w = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    unet = problem.lower(w)
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the lower level must move the UNet"
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())  # the original is untouched
    if method == "esd-x":
        assert all(".attn2." in n for n in changed)
    else:
        moved = sum(int((p != before[n]).sum()) for n, p in unet.named_parameters())
        assert moved <= 0.3 * sum(p.numel() for p in unet.parameters()) + 1
    losses = problem.item_losses(unet)
    assert losses.shape == (4,) and torch.isfinite(losses).all()
    assert (losses > 0).all() if prompt_loss == "denoising" else (losses.abs() < 1).all()  # contrast: a difference
    partials = problem.lower_partials(unet)
    assert partials.shape == (4,) and torch.isfinite(partials).all()
