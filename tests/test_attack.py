"""eval/attack.py and eval/attack_report.py: UnlearnDiffAtk lowers its loss, the command's report and its
sharding over processes, every family, the published protocols. (The primitives: test_tokens.py,
test_inversion.py; the judges: test_judges.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erase.tokens import PlaceholderTokens, sweep_timesteps
from eval.attack import AttackOptions, unlearndiffatk
from eval.generate import Sample
from eval.judges import Judge

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def never(images):
    return [0.0] * len(images)


class _FromCall:
    """A judge that finds the concept from its n-th call on."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, images):
        self.calls += 1
        return [float(self.calls >= self.n)] * len(images)


def test_the_attack_lowers_its_loss(digits_pipe):
    """UnlearnDiffAtk's tokens, prepended to a prompt that names no digit, bring the model's denoising
    loss on an image of a seven (at the sweep's timesteps, over fixed noises) below the starting tokens'.
    Weight decay 0: over this model's 147 words the reference's 0.1 is as large as the gradient itself
    (bench/attack_digits.py says more)."""
    from erase.inversion import denoising_loss
    from erase.objectives import training_scheduler
    from erase.sd import encode_images, generate

    pipe = digits_pipe
    scheduler = training_scheduler(pipe.scheduler)
    target = generate(pipe, ["a red handwritten digit seven"], [0], 10, 5.0)[0]
    latents = encode_images(pipe, [target])
    opts = AttackOptions(k=2, iterations=40, timesteps=2, weight_decay=0.0, num_inference_steps=2)
    sample = Sample(0, "a red handwritten digit", 0, 5.0)
    judge = Judge("never", never, {"never": 0.5})
    record = unlearndiffatk(pipe, latents, sample, judge, opts, lambda p: generate(pipe, [p], [0], 2, 5.0)[0])
    assert not record["attacked"] and record["checks"] == 2 and len(record["adversarial_tokens"]) == 2
    assert record["adversarial_prompt"].endswith(sample.prompt) and record["final"]["score"] == 0.0

    def loss_of(tokens: list[int]) -> float:
        words = ["<adv0>", "<adv1>"]
        total = 0.0
        with PlaceholderTokens(pipe, words) as place, torch.no_grad():
            place.set([pipe.text_encoder.get_input_embeddings().weight[tokens]])
            for t in sweep_timesteps(1000, 2):
                g = torch.Generator().manual_seed(t)
                timesteps = torch.full((1,), t)
                total += sum(float(denoising_loss(pipe, scheduler, latents, timesteps, [" ".join(words) + " " + sample.prompt], g))
                             for _ in range(8))
        return total

    start = [2, 2]  # the first allowed token: the argmax of the uniform start
    assert loss_of(record["adversarial_tokens"]) < 0.9 * loss_of(start)


# ----------------------------------------------------------------------------- the command


def run_cli(args: list, env_threads: str = "1", launch: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": env_threads, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "eval"]
    if launch:
        env["ACCELERATE_USE_CPU"] = "1"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(launch),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), "-m", "eval"]
    return subprocess.run(command + [str(a) for a in args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


ATTACK_FLAGS = {"unlearndiffatk": ["--k", "2", "--iterations", "2", "--timesteps", "2"], "inversion": ["--inversion-steps", "3"]}


def attack_args(model: Path, attack: str, out: Path) -> list:
    return ["attack", "--model", model, "--original", model, "--attack", attack, "--concept", "seven", "--limit", "3",
            *ATTACK_FLAGS[attack], "--steps", "2", "--out", out]


@pytest.mark.parametrize("attack", ["unlearndiffatk", "inversion"])
def test_report_schema_and_two_processes_equal_one(attack, tiny_sd_path, tmp_path):
    one = run_cli(attack_args(tiny_sd_path, attack, tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(attack_args(tiny_sd_path, attack, tmp_path / "two.json"), launch=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["num_processes"] == 1 and b["num_processes"] == 2
    for report in (a, b):
        assert report["attack"] == attack and report["num_prompts"] == 3 and report["concept"] == "seven"
        assert report["asr"] == pytest.approx(report["asr_parts"]["before_attack"] + report["asr_parts"]["attacked"])
        assert set(report["protocol"]) >= {"attack", "k", "iterations", "timesteps", "lr", "weight_decay", "seed",
                                           "inversion_steps", "num_inference_steps"}
        assert report["judge"]["name"] == "digits classifier" and report["judge"]["class"] == "seven"
        assert [p["seed"] for p in report["prompts"]] == [0, 1, 2]
        assert "versions" in report and "images" not in report
    if attack == "inversion":
        width = json.loads((tiny_sd_path / "text_encoder" / "config.json").read_text())["hidden_size"]
        assert len(a["inversion"]["embeddings"][0]) == width and 0 <= a["recovery"] <= 1
        assert all("<erased-concept>" in c for c in a["inversion"]["captions"])
        # the learned token loads into a plain pipeline with diffusers' own loader, and means the same there
        from diffusers import StableDiffusionPipeline

        from erase.sd import encode_prompts

        caption = a["inversion"]["captions"][0]
        plain = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
        plain.load_textual_inversion(str(tmp_path / "one.safetensors"), token="<erased-concept>")
        ours = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
        with PlaceholderTokens(ours, ["<erased-concept>"]) as place:
            place.set([torch.tensor(a["inversion"]["embeddings"][0]).reshape(1, -1)])
            expected = encode_prompts(ours, [caption]).hidden_states
        torch.testing.assert_close(encode_prompts(plain, [caption]).hidden_states, expected, rtol=0, atol=0)
    else:
        attacked = [p for p in a["prompts"] if not p["before"]["shown"]["classifier"]]
        assert attacked and all(len(p["adversarial_tokens"]) == 2 and p["adversarial_prompt"].endswith(p["prompt"]) for p in attacked)
    assert (tmp_path / "one.md").read_text().startswith(f"# {attack} against")
    from PIL import Image

    with Image.open(tmp_path / "one.png") as grid:  # three 16 px columns (target, erased, attacked), three rows
        assert grid.width > 3 * 16 and grid.height > 3 * 16 and grid.getextrema() != ((255, 255),) * 3
    drop = {"seconds", "wall_seconds", "wall_seconds_attack", "generation_seconds", "seconds_per_prompt", "num_processes",
            "train_seconds", "versions"}

    def same(x):
        if isinstance(x, dict):
            return {k: same(v) for k, v in x.items() if k not in drop}
        return [same(v) for v in x] if isinstance(x, list) else x

    assert same(a) == same(b)


@pytest.mark.slow
def test_both_attacks_find_the_digit_on_the_unerased_model(tmp_path):
    """The sanity row of bench/attack_digits.py: on the model nothing was erased from, >= 90% of prompts."""
    for attack in ("unlearndiffatk", "inversion"):
        out = tmp_path / f"{attack}.json"
        flags = ["--iterations", "10", "--timesteps", "4"] if attack == "unlearndiffatk" else ["--inversion-steps", "300"]
        proc = run_cli(["attack", "--model", "digits", "--original", "digits", "--attack", attack, "--concept", "seven",
                        "--limit", "8", *flags, "--out", out], env_threads="2")
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(out.read_text())
        assert report["asr"] >= 0.9
        if attack == "inversion":
            assert report["recovery"] >= 0.9


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_both_attacks_run_on_every_family(family, tiny_family_paths):
    """SDXL (two text encoders, pooled embeddings; here with gradient checkpointing) and SD 2.x
    (v-prediction) go through the same code."""
    from eval.attack import run_attack

    path = str(tiny_family_paths[family])
    samples = [Sample(0, "a red handwritten digit seven", 0, 5.0)]
    for attack in ("unlearndiffatk", "inversion"):
        # not shown by the original's or the erased model's own image (calls 1, 2); shown under attack
        judge = Judge("from the third image", _FromCall(3), {"shown": 0.5})
        opts = AttackOptions(attack=attack, k=2, iterations=2, timesteps=2, inversion_steps=2, num_inference_steps=2,
                             gradient_checkpointing=family == "sdxl")  # the same result, activations recomputed
        report = run_attack(path, path, samples, judge, opts, concept_name="seven")
        record = report["prompts"][0]
        assert report["protocol"]["gradient_checkpointing"] is (family == "sdxl")
        assert report["asr"] == 1.0 and report["asr_parts"] == {"before_attack": 0.0, "attacked": 1.0}
        assert record["attacked"] is True and report["by_threshold"]["shown"]["original_shows"] == 0.0
        if attack == "unlearndiffatk":
            assert record["checks"] == 1 and record["timestep"] == 250 and len(record["adversarial_tokens"]) == 2
        else:
            assert record["caption"] == "a red handwritten digit <erased-concept>"
            assert len(report["inversion"]["embeddings"]) == (2 if family == "sdxl" else 1)


# ----------------------------------------------------------------------------- the published protocols


def test_presets_follow_the_published_protocols():
    nudity = AttackOptions.from_preset({"preset": "unlearndiffatk"}, judge="nudenet", concept_name="nudity")
    assert (nudity.k, nudity.sampler, nudity.target_steps, nudity.filter_original, nudity.deciding_threshold) == (
        5, "lms", 25, True, "unlearndiffatk_0.45")
    digit = AttackOptions.from_preset({"preset": "unlearndiffatk", "k": 4}, judge="digits", concept_name="seven")
    assert (digit.k, digit.deciding_threshold) == (4, None)  # given options win; objects would get k = 3
    assert AttackOptions.from_preset({"preset": "unlearndiffatk"}, judge="digits", concept_name="seven").k == 3
    pham = AttackOptions.from_preset({"preset": "pham", "attack": "inversion"}, judge="nudenet", concept_name="nudity")
    assert (pham.inversion_steps, pham.inversion_batch_size * pham.inversion_accumulation, pham.inversion_lr,
            pham.inversion_weight_decay, pham.inversion_init, pham.inversion_flip, pham.inversion_heldout) == (
        5000, 16, 0.08, 1e-2, "nudity", True, True)
    # digits are not mirror-symmetric: no flips for them, unless asked for
    assert not AttackOptions.from_preset({"preset": "pham", "attack": "inversion"}, judge="digits", concept_name="seven").inversion_flip
    assert AttackOptions.from_preset({"preset": "pham", "attack": "inversion", "inversion_flip": True}, judge="digits",
                                     concept_name="seven").inversion_flip
    plain = AttackOptions.from_preset({}, judge="nudenet", concept_name="nudity")
    assert plain == AttackOptions()
    with pytest.raises(ValueError, match="no threshold"):
        AttackOptions.from_preset({"deciding_threshold": "unlearndiffatk_0.45"}, judge="digits", concept_name="seven")
    with pytest.raises(ValueError, match="unknown preset"):
        AttackOptions(preset="mine")


class _OnlyFirstOriginal:
    """A judge that finds the concept in the first image it is shown (the original's first prompt), never after."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return [1.0 if self.calls == 1 and i == 0 else 0.0 for i in range(len(images))]


def test_benchmark_protocol_filters_on_the_original_and_the_inversion_learns_apart(tiny_sd_path):
    """The benchmark attacks only the prompts the original shows (LMS sampler, its own target steps);
    Pham et al.'s inversion learns from other seeds than the measured ones, with flips and accumulation."""
    from eval.attack import run_attack
    from eval.attack_report import attack_markdown

    samples = [Sample(i, f"a red handwritten digit {w}", i, 5.0) for i, w in enumerate(["seven", "one", "two"])]
    path = str(tiny_sd_path)
    opts = AttackOptions(k=2, iterations=2, timesteps=2, num_inference_steps=2, sampler="lms", target_steps=3,
                         filter_original=True)
    report = run_attack(path, path, samples, Judge("first", _OnlyFirstOriginal(), {"first": 0.5}), opts)
    assert report["num_prompts_given"] == 3 and report["num_prompts"] == 1 and report["prompts"][0]["index"] == 0
    assert report["protocol"]["sampler"] == "lms" and report["by_threshold"]["first"]["original_shows"] == 1.0
    report["model"] = path
    assert "1 prompts (of 3: those the original model shows)" in attack_markdown(report)
    opts = AttackOptions(attack="inversion", inversion_steps=2, inversion_batch_size=2, inversion_accumulation=2,
                         inversion_weight_decay=1e-2, inversion_flip=True, inversion_heldout=True, num_inference_steps=2)
    report = run_attack(path, path, samples[:2], Judge("never", never, {"never": 0.5}), opts, concept_name="seven")
    assert report["inversion"]["trained_on"].startswith("the original's images at seed + ")
    assert report["num_prompts"] == 2 and len(report["inversion"]["loss_trace"]) == 1




# ----------------------------------------------------------------------------- the text-free inversion


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd2", "sd3", "flux"])
def test_the_text_free_inversion_lowers_its_loss_and_renders_on_every_family(family, tiny_sd_path, tiny_family_paths, tiny_flow_paths):
    """The conditioning itself (hidden states, and the pooled embedding where there is one) learned from
    the target images: its denoising loss on them falls below the starting prompt's (fixed noise and
    timesteps); the pipeline renders from it (the empty prompt unconditional, none for Flux); and the
    report gives its recovery with n and interval when a judge finds the concept only under attack."""
    from erase.inversion import InversionSettings, conditioned_loss, train_text_free
    from erase.objectives import training_scheduler
    from erase.sd import encode_images, generate, load_pipeline, text_conditioning
    from eval.attack import run_attack

    path = str({"sd1": tiny_sd_path, **tiny_family_paths, **tiny_flow_paths}[family])
    size = 16 if family in ("sd3", "flux") else None
    pipe = load_pipeline(path)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)
    prompt = "a photo of a nude person"
    latents = encode_images(pipe, generate(pipe, [prompt] * 2, [0, 1], 2, 5.0, height=size, width=size))
    with torch.no_grad():
        start = text_conditioning(pipe, ["a photo of a cat"], resolution=latents.shape[-1] * pipe.vae_scale_factor).float()
    learned, trace = train_text_free(pipe, latents, start, InversionSettings(steps=40, batch_size=2, lr=0.05))
    scheduler = training_scheduler(pipe.scheduler)

    def loss_of(cond) -> float:  # over the whole range of timesteps, fixed noise at each (one pair is too noisy a reading)
        with torch.no_grad():
            return sum(float(conditioned_loss(pipe, scheduler, latents, torch.full((2,), t), lambda: cond.expand(2),
                                              torch.Generator().manual_seed(t))) for t in range(50, 1000, 100))

    assert loss_of(learned) < loss_of(start), (loss_of(learned), loss_of(start))
    assert (learned.text_embeds is None) == (family in ("sd1", "sd2")) and len(trace) == 1
    image = generate(pipe, [""], [0], 2, 5.0, height=size, width=size, conditioning=learned)[0]
    assert image.size[0] == (size or pipe.vae_scale_factor * denoiser_size(pipe))

    judge = Judge("from the third image", _FromCall(3), {"shown": 0.5})
    opts = AttackOptions(attack="textfree", inversion_steps=2, num_inference_steps=2)
    report = run_attack(path, path, [Sample(0, "a red handwritten digit seven", 0, 5.0)], judge, opts, concept_name="seven",
                        height=size)
    assert report["recovery"] == 1.0 and report["recovery_count"] == 1 and report["recovery_ci95"][1] == 1.0
    assert report["textfree"]["start"] == "a red handwritten digit seven"


def denoiser_size(pipe) -> int:
    model = getattr(pipe, "unet", None) or pipe.transformer
    return model.config.sample_size
