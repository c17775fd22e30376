"""erase/adversarial.py and `erase/train.py --adversarial`: the inner attack, the doubled forget batch,
and what the min-max loop buys on the embedded model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from erase.adversarial import AdversarialSettings, AdversarialTokens, adversarial_captions, adversarial_rows, with_adversarial
from erase.concepts import load_concept
from erase.conditioning import Conditioning
from erase.saliency import load_mask

from test_train import check_erasure, run_train, small_run, weights


def test_captions_put_the_tokens_where_each_concepts_name_was() -> None:
    seven, red = load_concept("seven"), load_concept("red")
    captions = adversarial_captions([seven, red], ["a red handwritten digit seven", "a red handwritten digit two"], "<a> <b>")
    # a prompt both concepts forget takes the first concept's caption; a colour is replaced where it stands
    assert captions == {"a red handwritten digit seven": "a red handwritten digit <a> <b>",
                        "a red handwritten digit two": "a <a> <b> handwritten digit two"}


def test_the_forget_batch_is_doubled_with_the_clean_prompt_kept_for_the_teacher() -> None:
    clean, adv, anchor = (Conditioning(torch.full((2, 77, 4), v)) for v in (1.0, 2.0, 3.0))
    forget = {"noisy_latents": torch.randn(2, 4, 8, 8), "timesteps": torch.tensor([5, 9]), "encoder_hidden_states": clean,
              "anchor_hidden_states": anchor, "prompt_rows": torch.tensor([1, 1])}
    doubled = with_adversarial(forget, adv)
    assert torch.equal(doubled["noisy_latents"], torch.cat([forget["noisy_latents"]] * 2))
    assert doubled["timesteps"].tolist() == [5, 9, 5, 9]
    assert doubled["encoder_hidden_states"].hidden_states[:, 0, 0].tolist() == [1, 1, 2, 2]
    assert doubled["teacher_hidden_states"].hidden_states[:, 0, 0].tolist() == [1, 1, 1, 1]
    assert doubled["anchor_hidden_states"].hidden_states[:, 0, 0].tolist() == [3, 3, 3, 3]


def test_each_forget_row_is_trained_under_one_pooled_rounds_vectors() -> None:
    """Prompt rows 0-2, row 1 the only forget prompt; two pooled rounds. Without a generator the last
    round's caption; with one, each row under a drawn round (both occur); other rows stay themselves."""
    class Pool:  # the adversary's two rounds: the caption's encoding is the round's vector
        def snapshots(self):
            return [[torch.tensor([10.0])], [torch.tensor([20.0])]]

        def conditioning(self, texts, resolution=None, vectors=None):
            return Conditioning(vectors[0].expand(len(texts), 77, 4).clone())

    data = type("Data", (), {"forget_prompt": torch.tensor([1, 1]), "texts": ["a", "b", "c"],
                             "prompt_embeds": Conditioning(torch.arange(3.0)[:, None, None].expand(3, 77, 4).clone())})
    rows = adversarial_rows(Pool(), data, type("Cfg", (), {"resolution": None}))
    value = lambda cond: cond.hidden_states[:, 0, 0].tolist()
    assert value(rows(torch.tensor([0, 1, 2]))) == [0, 20, 2]
    drawn = value(rows(torch.ones(64, dtype=torch.long), torch.Generator().manual_seed(0)))
    assert set(drawn) == {10, 20}
    assert value(rows(torch.tensor([0, 2]), torch.Generator().manual_seed(0))) == [0, 2]


def test_the_inner_attack_lowers_its_loss_on_the_current_weights(digits_pipe) -> None:
    """Two warm-started rounds lower the denoising loss of the concept's images under the adversarial
    captions (measured at fixed noise and timesteps); the UNet's weights get no gradient."""
    from contextlib import nullcontext

    from erase.inversion import denoising_loss
    from erase.objectives import step_generator, training_scheduler
    from erase.sd import encode_images, generate
    from erase.tokens import PlaceholderTokens

    concept = load_concept("seven")
    prompts = concept.forget
    latents = encode_images(digits_pipe, generate(digits_pipe, prompts, [0, 1, 2, 3], 10, 5.0))
    adversary = AdversarialTokens(digits_pipe, AdversarialSettings(vectors=2, steps=20, lr=0.05), [concept])
    scheduler = training_scheduler(digits_pipe.scheduler)

    @torch.no_grad()
    def fixed_loss() -> float:
        with PlaceholderTokens(digits_pipe, adversary.tokens) as place:
            place.set([v.detach() for v in adversary.vectors])
            t = torch.tensor([100, 300, 500, 700])
            return float(denoising_loss(digits_pipe, scheduler, latents, t, [adversary.captions[p] for p in prompts],
                                        step_generator(5, 5)))

    before = fixed_loss()
    adversary.attack(latents, prompts, scheduler, seed=0, step=0, autocast=nullcontext)
    middle = fixed_loss()
    adversary.attack(latents, prompts, scheduler, seed=0, step=10, autocast=nullcontext)
    after = fixed_loss()
    assert after < middle < before, (before, middle, after)
    assert all(p.grad is None for p in digits_pipe.unet.parameters())
    assert len(adversary.pool) == 2 and not torch.equal(adversary.pool[0][0], adversary.pool[1][0])  # every round pooled
    assert torch.equal(adversary.pool[1][0], adversary.vectors[0].detach())
    rows = adversary.conditioning(prompts[:1])
    assert rows.hidden_states.shape == (1, 77, digits_pipe.text_encoder.config.hidden_size)


@pytest.mark.parametrize("method", ["salun", "esd-x"])
def test_an_adversarial_run_keeps_masked_out_and_frozen_weights_and_records_its_settings(method: str, tiny_sd_path: Path,
                                                                                          tmp_path: Path, monkeypatch) -> None:
    """... and every outer step trains the doubled half of its forget batch under the inner attack's
    captions, not under the clean prompts again (what the outer step's batches are watched for)."""
    import erase.erasure

    halves = []

    def watched(forget, adversarial):
        halves.append((forget["encoder_hidden_states"], adversarial))
        return with_adversarial(forget, adversarial)

    monkeypatch.setattr(erase.erasure, "with_adversarial", watched)
    out = tmp_path / "out"
    proc = run_train(["--concept", "nudity", "--method", method, "--adversarial", "--adversarial-every", "2", "--adversarial-steps", "2",
                      "--adversarial-vectors", "3", "--logging-steps", "1", *small_run(tiny_sd_path, out, tmp_path / "cache")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    hidden = lambda c: c.hidden_states if isinstance(c, Conditioning) else c
    assert len(halves) == 3 and all((hidden(clean) - hidden(adv)).abs().max() > 1e-3 for clean, adv in halves)
    check_erasure(tiny_sd_path, out)
    record = json.loads((out / "erase_config.json").read_text())
    adversarial = record["adversarial"]
    assert record["config"]["adversarial"] and adversarial["settings"]["vectors"] == 3 and len(adversarial["tokens"]) == 3
    # "nudity" is not a word of the prompt: the tokens go first
    assert adversarial["captions"]["a photo of a nude person"] == "<erased-concept-0> <erased-concept-1> <erased-concept-2> a photo of a nude person"
    assert record["final_losses"]["attack_loss"] > 0
    from diffusers import StableDiffusionPipeline

    assert len(StableDiffusionPipeline.from_pretrained(out).tokenizer) == len(StableDiffusionPipeline.from_pretrained(tiny_sd_path).tokenizer)


def test_the_concept_files_adversarial_recipe_applies_under_adversarial_only(tmp_path: Path) -> None:
    """prompts/digits.yaml: beta 0.5, and 3 under --adversarial (the trade-off bench); a flag beats both."""
    from erase.train import parse_args

    common = ["--model", "digits", "--concept", "three", "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    assert parse_args(common).beta == 0.5 and not parse_args(common).adversarial
    assert parse_args(common + ["--adversarial"]).beta == 3.0
    assert parse_args(common + ["--adversarial", "--beta", "1"]).beta == 1.0


def test_adversarial_training_of_the_text_encoder_alone_leaves_the_unet(tiny_sd_path: Path, tmp_path: Path) -> None:
    """`--adversarial-trains text-encoder` (AdvUnlearn's choice): the UNet bit-identical, the text encoder
    trained and published in fp32, no UNet weight in the mask, the choice recorded."""
    out = tmp_path / "out"
    proc = run_train(["--concept", "nudity", "--adversarial", "--adversarial-every", "2", "--adversarial-steps", "2",
                      "--adversarial-trains", "text-encoder", *small_run(tiny_sd_path, out, tmp_path / "cache")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = weights(tiny_sd_path, "unet"), weights(out, "unet")
    assert all(torch.equal(before[k], after[k]) for k in before)
    te_before, te_after = weights(tiny_sd_path, "text_encoder"), weights(out, "text_encoder")
    assert any(not torch.equal(te_before[k], te_after[k]) for k in te_before)
    assert all(v.dtype == te_before[k].dtype for k, v in te_after.items())
    assert not any(bool(m.any()) for m in load_mask(out / "saliency_mask.safetensors").values())
    record = json.loads((out / "erase_config.json").read_text())
    assert record["adversarial"]["trains"] == "text-encoder" and record["mask"]["trainable_fraction"] == 0


@pytest.mark.slow
def test_after_adversarial_training_the_concept_is_harder_to_invert(tmp_path: Path) -> None:
    """Same seed, same steps, same beta, plain and adversarial SalUn on "seven"; then a fresh two-vector inversion
    (another seed, other images) against each. Measured at 40 steps: final inversion loss 0.118
    after plain training, 0.148 after adversarial."""
    from erase.inversion import InversionSettings, inversion_captions, train_inversion
    from erase.sd import encode_images, generate, load_pipeline

    losses = {}
    original = load_pipeline("digits")
    prompts = load_concept("seven").forget
    images = generate(original, prompts, [100, 101, 102, 103], 25, 5.0)
    for name, extra in (("plain", []), ("adversarial", ["--adversarial", "--adversarial-every", "5", "--beta", "0.5"])):  # the same beta
        out = tmp_path / name
        proc = run_train(["--model", "digits", "--concept", "seven", "--max-train-steps", "40", "--output-dir", str(out),
                          "--cache-dir", str(tmp_path / "cache"), "--checkpointing-steps", "0", *extra])
        assert proc.returncode == 0, proc.stderr[-3000:]
        pipe = load_pipeline(str(out))
        for part in (pipe.unet, pipe.text_encoder, pipe.vae):
            part.requires_grad_(False)
        settings = InversionSettings(steps=150, batch_size=4, lr=0.02, vectors=2, seed=3)
        _, trace = train_inversion(pipe, encode_images(pipe, images), inversion_captions(prompts, "seven", settings.phrase), settings)
        losses[name] = trace[-1]
    assert losses["adversarial"] > 1.1 * losses["plain"], losses


def test_an_overflow_on_one_process_skips_the_step_on_every_process(tmp_path: Path) -> None:
    """fp16's gradient scaler with trained text encoders over 2 gloo processes, an inf in one process's
    gradient: both skip that step (weights unchanged, the scale halved alike), then both take the next,
    finite and equal. (Averaged inside the step, as before, the process that skipped never joined the
    all-reduce its peer waited in: the run hung until the collective timeout.)"""
    from test_sharding import ENV, ROOT, launch

    out = tmp_path / "overflow.json"
    proc = subprocess.run(launch(2) + [str(ROOT / "tests" / "fp16_overflow_script.py"), str(out)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["world"] == 2 and found["same_weights"]
    for record in found["records"]:
        assert [r["moved"] for r in record] == [False, True] and all(r["finite"] for r in record)
        assert record[0]["scale"] == 2.0**7  # halved after the skipped step


def test_the_inner_attack_scales_its_loss_as_fp16_needs(digits_pipe) -> None:
    """A power-of-two loss scale (what --mixed-precision fp16 uses: 2^16) gives the unscaled steps to the bit
    in fp32; a scale whose gradients overflow skips the steps, leaving the vectors where they were."""
    from contextlib import nullcontext

    from erase.objectives import training_scheduler
    from erase.sd import encode_images, generate

    concept = load_concept("seven")
    latents = encode_images(digits_pipe, generate(digits_pipe, concept.forget, [0, 1, 2, 3], 4, 5.0))
    scheduler = training_scheduler(digits_pipe.scheduler)
    found = {}
    for scale in (1.0, 2.0**16, 2.0**300):
        adversary = AdversarialTokens(digits_pipe, AdversarialSettings(vectors=2, steps=3, lr=0.05), [concept])
        start = [v.detach().clone() for v in adversary.vectors]
        adversary.attack(latents, concept.forget, scheduler, seed=0, step=0, autocast=nullcontext, loss_scale=scale)
        found[scale] = [v.detach() for v in adversary.vectors]
    assert all(torch.equal(a, b) for a, b in zip(found[1.0], found[2.0**16], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(found[1.0], start, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(found[2.0**300], start, strict=True))  # inf: every step skipped
