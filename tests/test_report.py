"""eval/report.py: `python -m eval compare`, its JSON, Markdown and grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from eval.nudity import (
    EXPOSED_LABELS,
)

from eval_support import (
    I2P_ROWS,
    digits_classifier_built,
    write,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- compare


def test_compare_writes_json_markdown_and_grid(tiny_sd_path, i2p_csv, tmp_path, cli):
    from conftest import build_tiny_pipeline

    erased = tmp_path / "erased"
    build_tiny_pipeline(seed=1).save_pretrained(erased, safe_serialization=True)
    out = tmp_path / "report"
    metrics = "nudity,fid" if digits_classifier_built() else "nudity"
    assert cli("compare", tiny_sd_path, erased, "--prompts", i2p_csv, "--metrics", metrics, "--features", "digits",
               "--images-per-prompt", 2, "--steps", 2, "--grid-prompts", 4, "--out", out) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["samples"]) == 10 and report["grid_prompts"] == [I2P_ROWS[i]["prompt"] for i in (0, 1, 3, 4)]
    for role in ("original", "erased"):
        assert list(report[role]["nudity"]["counts"]) == list(EXPOSED_LABELS)
    markdown = (out / "report.md").read_text()
    assert "| NudeNet FEET_EXPOSED | 0 | 0 | +0 |" in markdown and "grid.png" in markdown
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (80 + 4 * 98, 14 + 2 * 98)  # label column, number row, two rows of 96 + 2
    if digits_classifier_built():  # two unrelated random models: 137 measured (a model against itself: 0, below)
        assert report["fid_erased_vs_original"]["fid"] > 50


def test_compare_of_a_model_with_itself(tiny_sd_path, tmp_path, cli):
    """Same prompts and seeds: identical rows in the grid, and FID 0 when the digits features exist."""
    prompts = write(tmp_path / "p.txt", "a red digit\na blue digit\na green digit\n")
    out = tmp_path / "same"
    metrics = "nudity,fid" if digits_classifier_built() else "nudity"
    assert cli("compare", tiny_sd_path, tiny_sd_path, "--prompts", prompts, "--metrics", metrics, "--features",
               "digits", "--images-per-prompt", 2, "--steps", 2, "--out", out) == 0
    grid = np.asarray(Image.open(out / "grid.png"))
    top, bottom = grid[14 : 14 + 96, 80:], grid[14 + 98 : 14 + 98 + 96, 80:]
    assert np.array_equal(top, bottom) and top.std() > 0
    report = json.loads((out / "report.json").read_text())
    assert report["original"] == report["erased"]
    if digits_classifier_built():
        assert abs(report["fid_erased_vs_original"]["fid"]) < 1e-3


def test_each_erased_concept_on_its_own_and_the_retained_rest(tmp_path):
    """A folder that erased seven and red: each is located among the digits task's heads, its own
    images are counted apart, and the retained rest is the images that show neither."""
    from eval.classes import ClassTask
    from eval.generate import Generated, Sample
    from eval.report import compare_markdown, concept_rates, erased_concepts

    erased = tmp_path / "erased"
    erased.mkdir()
    concepts = [{"name": "seven", "target": {"digit": 7}}, {"name": "red", "target": {"colour": "red"}}]
    (erased / "erase_config.json").write_text(json.dumps({"concept": {"name": "seven+red"}, "concepts": concepts}))
    heads = {"digit": [str(d) for d in range(10)], "colour": ["red", "green", "blue", "white"]}
    task = ClassTask("digits", heads, [], lambda images: {})
    located, why = erased_concepts(str(erased), task)
    assert why is None and [(c["head"], c["class_index"]) for c in located] == [("digit", 7), ("colour", 0)]
    # every (digit, colour) once; the model still draws red sevens as sevens but every other red as green
    scored = [Generated(Sample(i, "", 0, 5.0, {"digit": d, "colour": c}),
                        {"digit": d, "colour": 1 if (c == 0 and d != 7) else c}) for i, (d, c) in enumerate(
                            (d, c) for d in range(10) for c in range(4))]
    seven, red = (concept_rates(task, scored, c, located) for c in located)
    assert seven["shown"] == 1.0 and seven["num_images"] == 4
    assert red["shown"] == pytest.approx(1 / 10) and red["num_images"] == 10
    assert seven["num_retained_images"] == red["num_retained_images"] == 27  # neither a seven nor red
    assert seven["retained_mean_accuracy"] == {"digit": 1.0, "colour": 1.0}
    report = {"options": {"original": "o", "erased": "e", "images_per_prompt": 1, "num_inference_steps": 1, "seed": 0},
              "samples": [], "concepts": located, "grid_prompts": [],
              "original": {"concepts": {"seven": seven, "red": red}}, "erased": {"concepts": {"seven": seven, "red": red}}}
    markdown = compare_markdown(report)
    assert "Erased concepts `seven`, `red` (digit = 7; colour = red)" in markdown
    assert "images without any of them (27)" in markdown and markdown.count("its images still showing") == 2


def test_grid_columns_carry_their_titles():
    """The attack grid's columns say what they hold (original, erased, under attack), not 1, 2, 3."""
    from eval.attack_report import ATTACK_GRID_COLUMNS
    from eval.report import image_grid

    rows = [[np.full((16, 16, 3), v, np.uint8) for v in (0, 100, 200)]]
    numbered, titled = image_grid(rows, ["#0 hit"]), image_grid(rows, ["#0 hit"], column_titles=ATTACK_GRID_COLUMNS)
    assert numbered.size == titled.size
    header = lambda im: np.asarray(im)[:14]
    assert not np.array_equal(header(numbered), header(titled)) and (header(titled) < 128).any()
    assert np.array_equal(np.asarray(numbered)[14:], np.asarray(titled)[14:])  # the images themselves are untouched
    width = 96 + 2
    for c, title in enumerate(ATTACK_GRID_COLUMNS):  # each title's ink stays over its own column
        ink = np.nonzero((header(titled)[:, 80 + c * width : 80 + (c + 1) * width] < 128).any(axis=(0, 2)))[0]
        assert len(ink), title
