"""erase/tokens.py: the relaxed one-hot tokens, the sweep, and placeholder words in every text encoder."""

from __future__ import annotations

import pytest
import torch

from erase.tokens import PlaceholderTokens, project_simplex, straight_through_one_hot, sweep_timesteps

from conftest import DEVICES


def simplex_by_sorting(a: torch.Tensor) -> torch.Tensor:
    """The exact Euclidean projection onto the probability simplex (Duchi et al. 2008), to check against."""
    u = a.sort(dim=-1, descending=True).values
    css = u.cumsum(-1) - 1
    k = torch.arange(1, a.shape[-1] + 1, device=a.device, dtype=a.dtype)
    rho = ((u - css / k) > 0).sum(-1, keepdim=True)
    tau = css.gather(-1, rho - 1) / rho
    return (a - tau).clamp(min=0)


@pytest.mark.parametrize("device", DEVICES)
def test_projection_stays_on_the_simplex_and_is_the_euclidean_one(device):
    g = torch.Generator(device=device).manual_seed(0)
    for scale in (0.01, 1.0, 30.0):
        a = torch.randn(5, 997, generator=g, device=device) * scale
        p = project_simplex(a)
        assert p.device == a.device
        assert (p >= 0).all() and (p <= 1).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(5, device=device), atol=1e-5, rtol=0)
        torch.testing.assert_close(p, simplex_by_sorting(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(project_simplex(p), p, atol=1e-5, rtol=0)  # a point on it stays put


@pytest.mark.parametrize("device", DEVICES)
def test_straight_through_one_hot_is_a_token_with_a_gradient(device):
    g = torch.Generator(device=device).manual_seed(0)
    probs = project_simplex(torch.randn(3, 50, generator=g, device=device)).requires_grad_(True)
    for sample in (True, False):
        one_hot = straight_through_one_hot(probs, torch.Generator(device=device).manual_seed(1), sample=sample)
        assert one_hot.shape == probs.shape and (one_hot.sum(-1) == 1).all() and set(one_hot.unique().tolist()) == {0.0, 1.0}
        assert (probs.detach()[one_hot.bool()] > 0).all()  # only a token with probability can be drawn
        if not sample:
            assert (one_hot.argmax(-1) == probs.argmax(-1)).all()
        upstream = torch.randn(probs.shape, generator=g, device=device) * 3
        (grad,) = torch.autograd.grad((one_hot * upstream).sum(), probs)
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, upstream.clamp(-1, 1))  # straight through, clipped


def test_sweep_matches_the_reference_attack():
    assert sweep_timesteps(1000, 50)[:3] == [10, 30, 50] and sweep_timesteps(1000, 50)[-1] == 990
    assert sweep_timesteps(1000, 4) == [125, 375, 625, 875]


def test_a_placeholder_with_a_words_embedding_is_that_word(digits_pipe):
    """`<p> a red digit` with <p> holding the embedding of `seven` encodes exactly like `seven a red digit`;
    on exit the text encoder has its own embedding back."""
    from erase.sd import encode_prompts

    pipe = digits_pipe
    embedding = pipe.text_encoder.get_input_embeddings()
    seven = pipe.tokenizer("seven", add_special_tokens=False).input_ids
    assert len(seven) == 1
    expected = encode_prompts(pipe, ["seven a red digit", "a red digit"]).hidden_states
    with PlaceholderTokens(pipe, ["<p>"]) as place:
        place.set([embedding.weight[seven]])
        got = encode_prompts(pipe, ["<p> a red digit", "a red digit"]).hidden_states
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert pipe.text_encoder.get_input_embeddings() is embedding
    torch.testing.assert_close(encode_prompts(pipe, ["a red digit"]).hidden_states, expected[1:], rtol=0, atol=0)


def test_placeholders_reach_both_sdxl_text_encoders(tiny_family_paths):
    from erase.sd import encode_prompts, load_pipeline

    pipe = load_pipeline(str(tiny_family_paths["sdxl"]))
    word = pipe.tokenizer("seven", add_special_tokens=False).input_ids
    expected = encode_prompts(pipe, ["seven a red digit"])
    with PlaceholderTokens(pipe, ["<p>"]) as place:
        place.set([m[word] for m in place.embedding_matrices()])
        got = encode_prompts(pipe, ["<p> a red digit"])
    torch.testing.assert_close(got.hidden_states, expected.hidden_states, rtol=0, atol=0)
    torch.testing.assert_close(got.text_embeds, expected.text_embeds, rtol=0, atol=0)
