"""erase/uce.py: the closed-form edit (its algebra, what it touches) and `--method uce` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from erase.sd import encode_prompts
from erase.uce import UCEScales, _aligned_rows, _starts, cross_attention_projections, uce_edit, uce_matrix

from conftest import DEVICES, build_tiny_pipeline
from test_train import run_train, weights

FORGET = ["a red handwritten digit seven", "a blue handwritten digit seven"]
ANCHOR = ["a red handwritten digit eight", "a blue handwritten digit eight"]
PRESERVE = ["a red handwritten digit two", "a green handwritten digit five"]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


def test_edited_positions_follow_the_authors_rule_and_a_mid_prompt_swap(pipe) -> None:
    tok = pipe.tokenizer
    # "a red handwritten digit seven": start token, 5 words, end token; the last word is at 5
    assert _starts(tok, FORGET[0], ANCHOR[0]) == (5, 5)
    # a colour swapped mid-prompt is edited from the colour on
    assert _starts(tok, "a red handwritten digit seven", "a green handwritten digit seven") == (2, 2)
    # different lengths: each prompt from its own last word (the authors' alignment)
    assert _starts(tok, "a digit seven", "a red handwritten digit eight") == (3, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_the_factored_edit_equals_the_papers_per_layer_formula(pipe, device: str) -> None:
    """W = (lam W + s_e sum W c* c^T + s_p sum W c_p c_p^T)(lam I + s_e sum c c^T + s_p sum c_p c_p^T)^-1,
    written out per layer with an explicit inverse, equals W_old M from the one shared matrix."""
    pipe = pipe.to(device)
    scales = UCEScales(lam=0.3, erase=1.0, preserve=0.2)
    keys, targets = (t.double() for t in _aligned_rows(pipe, FORGET, ANCHOR))
    kept = encode_prompts(pipe, ["", *PRESERVE]).hidden_states.double().flatten(0, 1)
    m = uce_matrix(pipe, FORGET, ANCHOR, PRESERVE, scales)
    assert m.device.type == device
    eye = torch.eye(keys.shape[1], dtype=torch.float64, device=keys.device)
    for layer in cross_attention_projections(pipe.unet).values():
        w = layer.weight.double()
        mat1 = scales.lam * w + scales.erase * (w @ targets.T) @ keys + scales.preserve * (w @ kept.T) @ kept
        mat2 = scales.lam * eye + scales.erase * keys.T @ keys + scales.preserve * kept.T @ kept
        expected = mat1 @ torch.inverse(mat2)
        torch.testing.assert_close(w @ m, expected, rtol=1e-7, atol=1e-9)
    pipe.to("cpu")


def _edit(scales: UCEScales):
    """Edit a fresh tiny pipeline. Returns the UNet's weights before and after, the edited
    projections, the saved mask, and per projection (how much of the forget->anchor gap is left,
    how far the preserved prompts' outputs moved, relative to their size)."""
    pipe = build_tiny_pipeline()
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    layers = cross_attention_projections(pipe.unet)
    keys, targets = _aligned_rows(pipe, FORGET, ANCHOR)
    kept = encode_prompts(pipe, PRESERVE).hidden_states.flatten(0, 1)
    with torch.no_grad():
        old = {n: (layer(keys), layer(targets), layer(kept)) for n, layer in layers.items()}
        mask = uce_edit(pipe, FORGET, ANCHOR, PRESERVE, scales)
        moved = {n: (float((layer(keys) - old[n][1]).norm() / (old[n][0] - old[n][1]).norm()),
                     float((layer(kept) - old[n][2]).norm() / old[n][2].norm())) for n, layer in layers.items()}
    return before, dict(pipe.unet.named_parameters()), set(layers), mask, moved


def test_only_cross_attention_keys_and_values_move_towards_the_anchor_and_the_preserved_prompts_hold() -> None:
    before, after, layers, mask, moved = _edit(UCEScales())
    assert layers == {n for n, m in mask.items() if m.all()} and not any(m.any() for n, m in mask.items() if n not in layers)
    assert len(layers) == 8  # to_k and to_v of the tiny UNet's four cross-attentions (down 1, mid 1, up 2)
    for name in after:
        assert torch.equal(after[name], before[name]) != (name in layers), name
    # measured: 0.18-0.20 of the gap left, preserved outputs moved by 3-4 % (the tiny model's 32-wide
    # embeddings cannot take 144 forget rows to their anchors and keep 231 preserved rows exactly)
    assert all(gap < 0.3 and drift < 0.06 for gap, drift in moved.values()), moved
    # and the preserve term is what holds them: without it they move twice as far
    unpreserved = _edit(UCEScales(preserve=0.0))[-1]
    assert all(unpreserved[n][1] > 1.5 * moved[n][1] for n in moved), (moved, unpreserved)


def test_uce_on_the_embedded_model_erases_seven_and_keeps_the_rest(tmp_path: Path) -> None:
    """The command end to end: seconds, no image sets, and the erased digit is gone from the
    template prompts while the other digits are still drawn (digits classifier, 2 seeds each)."""
    from erase.digits import DEFAULT_GUIDANCE, DEFAULT_STEPS, DIGIT_WORDS, classify_images, load_digits_classifier, prompt_for
    from erase.sd import generate, load_pipeline

    out = tmp_path / "seven"
    proc = run_train(["--model", "digits", "--concept", "seven", "--method", "uce", "--output-dir", str(out),
                      "--cache-dir", str(tmp_path / "cache")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "cache").exists()  # nothing generated
    record = json.loads((out / "erase_config.json").read_text())
    assert record["config"]["method"] == "uce" and record["seconds"]["edit"] < 5
    assert record["edited"] and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in record["edited"])
    pipe = load_pipeline(str(out))
    classifier = load_digits_classifier()
    prompts = [prompt_for(d, "red") for d in range(10) for _ in range(2)]
    digits, _ = classify_images(generate(pipe, prompts, [0, 1] * 10, DEFAULT_STEPS, DEFAULT_GUIDANCE), classifier)
    shown = digits.view(10, 2)
    assert not (shown[7] == 7).any(), shown.tolist()
    others = [d for d in range(10) if d != 7]
    assert sum(int((shown[d] == d).sum()) for d in others) >= 17, {DIGIT_WORDS[d]: shown[d].tolist() for d in others}
    original = weights(Path(load_pipeline("digits").name_or_path), "text_encoder")
    assert all(torch.equal(original[k], v) for k, v in weights(out, "text_encoder").items())


@pytest.mark.parametrize("extra, message", [
    (["--mask-ratio", "0.3"], "apply to salun only (uce edits the cross-attention keys and values"),
    (["--uce-lambda", "0"], "uce-lambda must be positive"),
    (["--preserve-scale", "-1"], "preserve_scale must be >= 0"),
])
def test_bad_uce_settings_are_refused_before_loading(extra: list[str], message: str, tmp_path: Path, capsys) -> None:
    from erase.train import main

    rc = main(["--model", "/does/not/exist", "--concept", "nudity", "--method", "uce", "--output-dir", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
