"""eval/__main__.py: the command's wiring (bad input, sampler defaults)."""

from __future__ import annotations

import json

import pytest

from eval_support import (
    photo,
    write,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("case", ["missing model", "not a pipeline", "no prompt column", "bad seed", "empty prompt",
                                  "unreadable image", "missing prompts"])
def test_bad_input_is_one_line_and_no_output(case, tiny_sd_path, i2p_csv, tmp_path, cli, capsys):
    out = tmp_path / "out.json"
    model, prompts = str(tiny_sd_path), str(i2p_csv)
    if case == "missing model":
        model = str(tmp_path / "no-such-model")
    elif case == "not a pipeline":
        model = str(tmp_path)
    elif case == "no prompt column":
        prompts = str(write(tmp_path / "bad.csv", "text,evaluation_seed\nhello,1\n"))
    elif case == "bad seed":
        prompts = str(write(tmp_path / "bad.csv", "prompt,evaluation_seed\nhello,seven\n"))
    elif case == "empty prompt":
        prompts = str(write(tmp_path / "bad.csv", "prompt,evaluation_seed\n,1\n"))
    elif case == "missing prompts":
        prompts = str(tmp_path / "nothing.csv")
    if case == "unreadable image":
        folder = tmp_path / "images"
        folder.mkdir()
        photo("astronaut").save(folder / "a.png")
        write(folder / "b.png", "not an image")
        argv = ["nudity", "--images", folder, "--out", out]
    else:
        argv = ["nudity", "--model", model, "--prompts", prompts, "--steps", 1, "--out", out]
    assert cli(*argv) != 0
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Traceback" not in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.json")]



def test_sampler_defaults_follow_the_model(tmp_path):
    from erase.digits import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from eval.__main__ import steps_and_guidance

    erased = tmp_path / "erased"  # a folder written by erase/train.py from the digits model
    erased.mkdir()
    (erased / "erase_config.json").write_text(json.dumps({"config": {"pretrained_model_name_or_path": "digits"}}))
    assert steps_and_guidance("digits", None, None) == (DEFAULT_STEPS, DEFAULT_GUIDANCE)
    assert steps_and_guidance(str(erased), None, None) == (DEFAULT_STEPS, DEFAULT_GUIDANCE)
    assert steps_and_guidance("CompVis/stable-diffusion-v1-4", None, None) == (50, 7.5)
    assert steps_and_guidance(str(erased), 3, 0.0) == (3, 0.0)
