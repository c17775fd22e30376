"""eval/fid.py: FID with any feature module, the digits features, two processes."""

from __future__ import annotations

import json

import pytest
import torch

from eval import fid as fid_module
from eval.fid import DigitsFeatures, MissingExtraError, fid_from_images, images_to_uint8, make_fid

from eval_support import (
    launch_two,
    needs_classifier,
    write,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- FID


class TinyFeatures(torch.nn.Module):
    """A fixed random conv feature extractor (no assets needed)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
        self.num_features = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255 if x.dtype == torch.uint8 else x)


def test_fid_with_any_feature_module():
    metric, name = make_fid(TinyFeatures())
    assert name == "TinyFeatures"
    g = torch.Generator().manual_seed(0)
    x = images_to_uint8(torch.rand(64, 3, 16, 16, generator=g))
    arrays = list(x.permute(0, 2, 3, 1).numpy())
    assert abs(fid_from_images(metric, arrays, arrays)) < 1e-3
    darker = list((x // 2).permute(0, 2, 3, 1).numpy())
    assert fid_from_images(metric, darker, arrays) > 1e-2


def test_fid_inception_needs_the_extra(monkeypatch, tiny_sd_path, tmp_path, cli, capsys):
    monkeypatch.setattr(fid_module, "inception_available", lambda: False)
    with pytest.raises(MissingExtraError, match=r"erase\[fid\]"):
        make_fid("inception")
    out = tmp_path / "fid.json"
    code = cli("fid", "--model", tiny_sd_path, "--reference-model", tiny_sd_path, "--prompts",
               write(tmp_path / "p.txt", "a red digit\n"), "--features", "inception", "--out", out)
    err = capsys.readouterr().err
    assert code != 0 and not out.exists()
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip().splitlines()[-1]]
    assert "pip install 'erase[fid]'" in err


@needs_classifier
def test_fid_is_zero_on_identical_sets_and_rises_with_distortion():
    from erase.digits import coloured_split, load_digits_classifier

    features = DigitsFeatures(load_digits_classifier())
    rgb, _, _ = coloured_split("test")  # held-out real digits in every colour, (716, 3, 32, 32) in [0, 1]
    rgb = rgb[::2]  # 358 images: more than the 128 features, so both covariances have full rank
    x = images_to_uint8(rgb)
    # uint8 and float inputs are the same to the extractor: torchmetrics' normalize=False / True
    assert torch.allclose(features(x), features(x.float() / 255))
    metric, name = make_fid("digits")
    assert name.startswith("digits")
    assert abs(fid_from_images(metric, x.permute(0, 2, 3, 1).numpy(), x.permute(0, 2, 3, 1).numpy())) < 1e-2
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(rgb.shape, generator=g)
    scores = []
    for sigma in (0.03, 0.1, 0.2, 0.4):
        noisy = images_to_uint8((rgb + sigma * noise).clamp(0, 1))
        metric.reset()
        metric.update(x, real=True)
        metric.update(noisy, real=False)
        scores.append(float(metric.compute()))
    assert all(a < b for a, b in zip(scores, scores[1:], strict=False)), scores
    from torchmetrics.image.fid import FrechetInceptionDistance

    as_float = FrechetInceptionDistance(feature=features, normalize=True)
    as_float.update(rgb, real=True)
    as_float.update((rgb + 0.4 * noise).clamp(0, 1), real=False)
    assert float(as_float.compute()) == pytest.approx(scores[-1], rel=0.05)


@needs_classifier
@pytest.mark.slow
def test_fid_two_processes_equals_one(tiny_sd_path, tmp_path, cli):
    """Each process feeds its shard to the metric; torchmetrics sums the statistics over processes."""
    from conftest import build_tiny_pipeline

    reference = tmp_path / "reference"
    build_tiny_pipeline(seed=1).save_pretrained(reference, safe_serialization=True)
    prompts = write(tmp_path / "p.txt", "a red digit\na blue digit\na green digit\n")
    args = ["fid", "--model", tiny_sd_path, "--reference-model", reference, "--prompts", prompts, "--features",
            "digits", "--images-per-prompt", 5, "--steps", 2, "--batch-size", 4]
    assert cli(*args, "--out", tmp_path / "one.json") == 0
    proc = launch_two(args + ["--out", tmp_path / "two.json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert one["num_generated"] == two["num_generated"] == 15 and one["num_reference"] == two["num_reference"] == 15
    assert one["fid"] > 0 and two["fid"] == pytest.approx(one["fid"], rel=1e-3)
    assert one["features"] == two["features"] == "digits-classifier-penultimate-128"
