"""SD3 / SD3.5 and FLUX.1 (flow-matching transformers) through the same commands as the UNet families,
on tiny pipelines built from configs (tests/conftest.py), shared by every test here."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erase.saliency import load_mask

from test_export import CHECK, export
from test_train import ENV, run_train, weights

FORGET, ANCHOR = "a photo of a nude person", "a photo of a person wearing clothes"
FROZEN = {"sd3": ["vae", "text_encoder", "text_encoder_2", "text_encoder_3"], "sd3-no-t5": ["vae", "text_encoder", "text_encoder_2"],
          "flux": ["vae", "text_encoder", "text_encoder_2"], "schnell": ["vae", "text_encoder", "text_encoder_2"]}
LOADS_AS = {"sd3": "StableDiffusion3Pipeline", "sd3-no-t5": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
            "schnell": "FluxPipeline"}


def erase(model: Path, out: Path, method: str, *extra: str) -> subprocess.CompletedProcess:
    return run_train(["--model", str(model), "--concept", "nudity", "--method", method, "--num-images", "4",
                      "--generation-steps", "2", "--train-batch-size", "2", "--saliency-batch-size", "2",
                      "--max-train-steps", "6", "--learning-rate", "1e-4", "--resolution", "16", "--beta", "0",
                      "--output-dir", str(out), "--cache-dir", str(out.parent / "cache"), *extra])


# ----------------------------------------------------------------------------- the objective


def test_flow_matching_noising_and_target_on_a_hand_computed_case() -> None:
    """x_t = (1 - sigma) x_0 + sigma eps and target eps - x_0, with t = 1000 sigma; and the target is
    the velocity diffusers' own Euler sampler integrates: one step from sigma = 1 to 0 lands on x_0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from erase.objectives import noisy_latents_and_target, training_scheduler

    scheduler = training_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    x0, eps = torch.tensor([[2.0, -1.0]]), torch.tensor([[4.0, 3.0]])
    x_t, target = noisy_latents_and_target(scheduler, x0, eps, torch.tensor([250.0]))
    assert torch.allclose(x_t, torch.tensor([[0.75 * 2 + 0.25 * 4, 0.75 * -1 + 0.25 * 3]]))
    assert torch.equal(target, torch.tensor([[2.0, 4.0]]))

    sampler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sampler.set_timesteps(sigmas=[1.0], device="cpu")
    x1, v = noisy_latents_and_target(scheduler, x0, eps, torch.tensor([1000.0]))
    assert torch.allclose(sampler.step(v, sampler.timesteps[0], x1).prev_sample, x0)


def test_training_sigmas_follow_the_schedulers_shift() -> None:
    """Static shift (SD3) as the scheduler's own sigmas; Flux's resolution-dependent shift as the
    scheduler's time_shift with the pipeline's mu for the image's token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from erase.families import FlowMatching

    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    u = torch.linspace(1, 1000, 1000).flip(0) / 1000
    assert torch.allclose(FlowMatching.from_scheduler(sd3).shifted(u, (1, 16, 128, 128)), sd3.sigmas, atol=1e-6)

    flux = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    mu = calculate_shift(64 * 64)  # a 1024 px image: 128 x 128 latents, 64 x 64 packed tokens
    assert torch.allclose(FlowMatching.from_scheduler(flux).shifted(u, (1, 16, 128, 128)), flux.time_shift(mu, 1.0, u), atol=1e-6)

    g = torch.Generator().manual_seed(0)
    t = FlowMatching.from_scheduler(sd3).draw_timesteps(20000, g, (1, 16, 128, 128))
    # logit-normal u has median 1/2, which the shift maps to 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert 0 < float(t.min()) and float(t.max()) < 1000 and math.isclose(float(t.median()), 750, abs_tol=10)


def test_flux_packing_round_trips_through_the_pipelines_own_pack_and_unpack() -> None:
    from diffusers import FluxPipeline

    from erase.families import latent_image_ids, pack_latents, unpack_latents

    latents = torch.randn(2, 4, 8, 6)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 8, 6))
    # the pipeline unpacks from the image size: latents of 8 x 6 with a VAE scale factor 2 are a 16 x 12 image
    assert torch.equal(unpack_latents(packed, 8, 6), FluxPipeline._unpack_latents(packed, 16, 12, 2))
    assert torch.equal(unpack_latents(packed, 8, 6), latents)
    assert torch.equal(latent_image_ids(8, 6, "cpu", torch.float32), FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_predict_is_the_pipelines_own_transformer_call(family: str, tiny_flow_paths) -> None:
    """One sampler step of the pipeline, its transformer's inputs and output captured: `predict` on the
    unpacked latents, 1000 sigma and our encoding of the same prompt gives the same output (guidance
    embedding, timestep scale, packing and ids included)."""
    from erase.families import denoiser, predict, unpack_latents
    from erase.sd import encode_prompts, load_pipeline

    pipe = load_pipeline(str(tiny_flow_paths[family]))
    model = denoiser(pipe)
    seen = {}
    model.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs, out=out[0]), with_kwargs=True)
    extra = {"max_sequence_length": 77}
    pipe([FORGET], num_inference_steps=1, height=16, width=16, guidance_scale=3.5, generator=torch.Generator().manual_seed(0), **extra)
    cond = encode_prompts(pipe, [FORGET])
    x, out = seen["hidden_states"], seen["out"]
    if family == "flux":
        x, out = unpack_latents(x, 8, 8), unpack_latents(out, 8, 8)
        t = seen["timestep"] * 1000
    else:  # classifier-free guidance: the batch is (empty, prompt)
        x, out, t = x[1:], out[1:], seen["timestep"][1:]
    with torch.no_grad():
        assert torch.allclose(predict(model, x, t, cond), out, atol=1e-5)


# ----------------------------------------------------------------------------- every method


@torch.no_grad()
def forget_distance(original: Path, folder: Path, method: str) -> float:
    """The method's forget loss for the transformer in `folder` on fixed noisy latents and timesteps."""
    from erase.families import denoiser, predict
    from erase.objectives import anchor_target, esd_target
    from erase.sd import encode_prompts, load_pipeline

    pipe = load_pipeline(str(original))
    cond, anchor, uncond = (encode_prompts(pipe, [p] * 4) for p in (FORGET, ANCHOR, ""))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([100.0, 300.0, 500.0, 800.0])
    model = type(denoiser(pipe)).from_pretrained(folder / "transformer")
    target = esd_target(denoiser(pipe), x, t, cond, uncond) if method.startswith("esd") else anchor_target(model, x, t, anchor)
    return float((predict(model, x, t, cond) - target).pow(2).mean())


CASES = [("sd3", "salun"), ("flux", "salun"), ("sd3-no-t5", "rl"), ("schnell", "esd-x"), ("flux", "esd-u"),
         ("sd3", "uce"), ("flux", "uce"),
         ("sd3", "esd-x"), pytest.param("flux", "rl", marks=pytest.mark.slow),
         pytest.param("schnell", "salun", marks=pytest.mark.slow), pytest.param("sd3-no-t5", "uce", marks=pytest.mark.slow)]


@pytest.mark.parametrize("family, method", CASES)
def test_each_method_erases_each_flow_family(family: str, method: str, tiny_flow_paths, tmp_path: Path) -> None:
    """Frozen components and masked-out transformer weights bit-identical; the forget prediction moved
    towards the method's target (UCE: the edited text projections only, the forget prompt's text tokens
    mapped nearer its anchor's)."""
    original, out = tiny_flow_paths[family], tmp_path / "out"
    proc = erase(original, out, method)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for component in FROZEN[family]:
        a, b = weights(original, component), weights(out, component)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component
    before, after = weights(original, "transformer"), weights(out, "transformer")
    mask = load_mask(out / "saliency_mask.safetensors")
    moved = {n for n in mask if not torch.equal(before[n], after[n])}
    for name, m in mask.items():
        assert torch.equal(after[name][~m], before[name][~m]), f"{name}: a masked-out weight moved"
    record = json.loads((out / "erase_config.json").read_text())
    if method == "uce":
        assert set(record["edited"]) == moved == {"context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"}
        return
    if method == "esd-x":  # the joint blocks' projections of the text tokens, nothing else
        assert moved and all(".attn.add_" in n and "_proj." in n for n in moved)
    if method == "esd-u":
        assert moved and not any(".attn.add_" in n and "_proj." in n for n in moved)
    if method == "salun":
        assert record["mask"]["trainable_fraction"] == pytest.approx(0.5, abs=0.01)
    ratio = forget_distance(original, out, method) / forget_distance(original, original, method)
    print(f"{family} {method}: forget loss after / before = {ratio:.3f}")  # shown with -s
    assert ratio < 0.99


def test_masked_master_weights_on_sd3(tiny_flow_paths, tmp_path: Path) -> None:
    """--master-weights masked: in fp32 the transformer equals the --optimizer-state masked run's to the
    bit, and its state is that run's plus 4 bytes a salient weight (the masters); under bf16 the
    transformer is held and saved in bf16, its masked-out weights exactly the original's rounded to bf16,
    the mask the fp32 run's, and the state 12 bytes a salient weight plus the bits."""
    original = tiny_flow_paths["sd3-no-t5"]
    runs = {"state": ("--optimizer-state", "masked"), "masters": ("--master-weights", "masked"),
            "bf16": ("--master-weights", "masked", "--mixed-precision", "bf16")}
    records = {}
    for name, flags in runs.items():
        proc = erase(original, tmp_path / name, "salun", *flags)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records[name] = json.loads((tmp_path / name / "erase_config.json").read_text())
    state, masters, low = (weights(tmp_path / n, "transformer") for n in runs)
    assert all(torch.equal(state[k], masters[k]) for k in state)
    fp32_mask = load_mask(tmp_path / "masters" / "saliency_mask.safetensors")
    state_mask = load_mask(tmp_path / "state" / "saliency_mask.safetensors")
    assert all(torch.equal(fp32_mask[n], state_mask[n]) for n in fp32_mask)
    kept = sum(int(m.sum()) for m in fp32_mask.values())
    assert records["masters"]["optimizer"]["master_weights"] == "masked"
    assert records["masters"]["optimizer"]["state_bytes"] - records["state"]["optimizer"]["state_bytes"] == 4 * kept
    before = weights(original, "transformer")
    mask = load_mask(tmp_path / "bf16" / "saliency_mask.safetensors")
    for n, m in mask.items():
        assert low[n].dtype == torch.bfloat16 and torch.equal(low[n][~m], before[n].to(torch.bfloat16)[~m]), n
    assert any(not torch.equal(low[n][m], before[n].to(torch.bfloat16)[m]) for n, m in mask.items())
    assert records["bf16"]["optimizer"]["state_bytes"] >= 12 * kept


def test_outputs_and_exports_load_into_plain_pipelines_in_a_fresh_process(tiny_flow_paths, tmp_path: Path) -> None:
    """The erased folder loads with StableDiffusion3Pipeline / FluxPipeline in a process that never imports
    this project, and a LoRA (diffusers layout, full rank; Flux also kohya's BFL names) and a delta applied
    to a fresh original reproduce its images; SD3's single file loads with every tensor equal."""
    cases = []
    for family, method, layouts in (("sd3", "salun", ["diffusers"]), ("flux", "uce", ["diffusers"]),
                                    ("flux", "esd-x", ["diffusers", "kohya"])):  # (Flux single files: the test below)
        original, out = tiny_flow_paths[family], tmp_path / f"{family}-{method}"
        assert erase(original, out, method).returncode == 0
        exports = [["lora", str(export(out, tmp_path / f"{out.name}-{layout}.safetensors", "--format", "lora", "--rank", "full",
                                       "--layout", layout))] for layout in layouts]
        exports.append(["delta", str(export(out, tmp_path / f"{out.name}-delta.safetensors", "--format", "delta"))])
        if family == "sd3":  # the whole pipeline in Stability's layout, read by StableDiffusion3Pipeline.from_single_file
            exports.append(["single-file", str(export(out, tmp_path / f"{out.name}-single.safetensors", "--format", "single-file"))])
        cases.append({"pipeline": LOADS_AS[family], "original": str(original), "erased": str(out), "exports": exports,
                      "prompts": [FORGET], "call": {"height": 16, "width": 16, "max_sequence_length": 77}, "method": method})
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(cases)], capture_output=True, text=True, cwd="/",
                          env={k: v for k, v in ENV.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(report))  # the measured pixel differences (0-255), shown with -s
    for result, case in zip(report, cases, strict=True):
        assert result["original"] > 0.25, case["pipeline"]  # the erasure changes the forget prompt's image (flux esd-x: 0.44)
        loras = [result[path] for kind, path in case["exports"] if kind == "lora"]
        assert all(result[path] == 0 for kind, path in case["exports"] if kind == "delta"), result
        # SD3's single file: every tensor of the loaded pipeline equal; images within float error (measured 0.0002)
        assert all(result[path] < 0.05 for kind, path in case["exports"] if kind == "single-file"), result
        assert result.get("tensors_differing", []) == [], result
        for lora in loras:
            if case["method"] == "uce":  # two Linear weights moved: a full-rank LoRA is exact to float error
                assert lora < 0.05, result
            else:  # SalUn and ESD-x also move biases (and SalUn norms), which no LoRA carries
                assert lora < 0.1 * result["original"], result


@pytest.mark.parametrize("family", ["flux", pytest.param("sd3", marks=pytest.mark.slow)])
def test_adversarial_erasure_puts_placeholder_words_in_clip_and_t5(family: str, tiny_flow_paths, tmp_path: Path) -> None:
    """The inner inversion's vectors live in every text encoder that reads the prompt (Flux: CLIP-L and
    T5; SD3: CLIP-L, CLIP-G and T5); the published pipeline knows none of the words."""
    from diffusers import DiffusionPipeline

    original, out = tiny_flow_paths[family], tmp_path / "out"
    proc = erase(original, out, "salun", "--adversarial", "--adversarial-every", "3", "--adversarial-steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "erase_config.json").read_text())
    assert record["final_losses"]["attack_loss"] > 0
    pipe, before = DiffusionPipeline.from_pretrained(out), DiffusionPipeline.from_pretrained(original)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if getattr(before, name, None) is not None:
            assert len(getattr(pipe, name)) == len(getattr(before, name)), name


def test_several_concepts_in_one_run_on_sd3(tiny_flow_paths, tmp_path: Path) -> None:
    """Two concepts, one mask, one loop: both forget prompts' sets are generated and recorded."""
    out = tmp_path / "out"
    proc = run_train(["--model", str(tiny_flow_paths["sd3"]), "--concept", "tench", "--concept", "church", "--num-images", "2",
                      "--generation-steps", "2", "--train-batch-size", "2", "--saliency-batch-size", "2", "--max-train-steps", "2",
                      "--resolution", "16", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "erase_config.json").read_text())
    assert [c["name"] for c in record["concepts"]] == ["tench", "church"]
    assert record["mask"]["trainable_fraction"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("family", ["flux", pytest.param("sd3", marks=pytest.mark.slow)])
def test_resume_after_kill_matches_the_uninterrupted_run(family: str, tiny_flow_paths, tmp_path: Path) -> None:
    from test_train import kill_after_checkpoint

    args = lambda out: ["--model", str(tiny_flow_paths[family]), "--concept", "nudity", "--num-images", "4",
                        "--generation-steps", "2", "--train-batch-size", "2", "--saliency-batch-size", "2",
                        "--max-train-steps", "8", "--checkpointing-steps", "2", "--resolution", "16",
                        "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert run_train(args(tmp_path / "full")).returncode == 0
    killed = tmp_path / "killed"
    kill_after_checkpoint(args(killed), killed)
    resumed = run_train(args(killed) + ["--resume-from-checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((killed / "erase_config.json").read_text())["resumed_from"]
    a, b = weights(tmp_path / "full", "transformer"), weights(killed, "transformer")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- refusals


def test_bad_flow_input_is_refused_in_one_line_before_a_model_loads(tiny_flow_paths, tmp_path: Path, capsys) -> None:
    import shutil

    from erase.train import main

    no_clip_g = tmp_path / "no-clip-g"
    shutil.copytree(tiny_flow_paths["sd3"], no_clip_g)
    shutil.rmtree(no_clip_g / "text_encoder_2")
    long_prompt = " ".join(["a red handwritten digit seven"] * 16)  # 81 T5 tokens; the tiny T5 reads 77
    cases = [
        (["--model", str(tiny_flow_paths["flux"]), "--forget-prompt", long_prompt, "--anchor-prompt", ANCHOR,
          "--retain-prompt", "a tree"], "T5 window is 77"),
        (["--model", str(no_clip_g), "--concept", "nudity"], "without text_encoder_2"),
        (["--model", str(tiny_flow_paths["flux"]), "--concept", "nudity", "--adversarial", "--adversarial-trains", "both"],
         "not supported on a FluxPipeline"),
    ]
    for argv, message in cases:
        rc = main(argv + ["--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_concept_inversion_learns_vectors_in_every_text_encoder(family: str, tiny_flow_paths) -> None:
    """Pham et al.'s inversion on a transformer: one vector per text encoder (SD3: CLIP-L, CLIP-G, T5;
    Flux: CLIP-L, T5), moved by the flow-matching denoising loss; the pipeline's tokenizers are its own after."""
    from erase.families import denoiser
    from erase.inversion import InversionSettings, inversion_captions, train_inversion
    from erase.sd import load_pipeline

    pipe = load_pipeline(str(tiny_flow_paths[family]))
    for part in (denoiser(pipe), pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False)
    sizes = [len(pipe.tokenizer), len(pipe.tokenizer_2)]
    opts = InversionSettings(steps=3, lr=0.1, batch_size=2)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    captions = inversion_captions([FORGET] * 4, "nude", opts.phrase)
    vectors, trace = train_inversion(pipe, latents, captions, opts)
    assert len(vectors) == (3 if family == "sd3" else 2) and all(v.shape[0] == 1 for v in vectors)
    assert all(math.isfinite(x) for x in trace)
    assert [len(pipe.tokenizer), len(pipe.tokenizer_2)] == sizes
    fewer, _ = train_inversion(pipe, latents, captions, dataclasses.replace(opts, steps=1))
    assert all(not torch.allclose(a, b) for a, b in zip(vectors, fewer, strict=True))  # every encoder's vector moves


@pytest.mark.slow
def test_two_processes_give_the_one_process_mask_on_sd3(tiny_flow_paths, tmp_path: Path) -> None:
    """Plain data parallelism (DDP over 2 gloo processes) against one process with 2 micro-batches."""
    from test_sharding import launch

    args = lambda out, *more: ["--model", str(tiny_flow_paths["sd3"]), "--concept", "nudity", "--num-images", "4",
                               "--generation-steps", "2", "--train-batch-size", "2", "--saliency-batch-size", "2",
                               "--max-train-steps", "3", "--learning-rate", "1e-3", "--resolution", "16",
                               "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), *more]
    one = run_train(args(tmp_path / "one", "--gradient-accumulation-steps", "2"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_train(args(tmp_path / "two"), launcher=launch(2))
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "erase_config.json").read_text())["num_processes"] == 2
    m1, m2 = load_mask(tmp_path / "one" / "saliency_mask.safetensors"), load_mask(tmp_path / "two" / "saliency_mask.safetensors")
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    a, b = weights(tmp_path / "one", "transformer"), weights(tmp_path / "two", "transformer")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_two_sharded_processes_give_the_one_process_mask_on_flux(tiny_flow_paths, tmp_path: Path) -> None:
    """--fsdp over 2 gloo processes, the transformer's blocks as the shard units, Adam's moments for the
    mask's entries only: the 1-process mask to the bit, weights within 1e-4, half the bytes each. 5 forget
    images in batches of 2: one process's shard needs 1 batch, the other's 2 (every batch a set of
    collectives: before the padding batches, the saliency pass deadlocked). Each process reads only its
    rows of the transformer and generates its share of the sets through the sharded model (3 batches of
    2: the process with one batch makes one more call): the one-process images, byte for byte."""
    from test_sharding import check_sharding_record, launch

    args = lambda out, cache, *more: ["--model", str(tiny_flow_paths["flux"]), "--concept", "nudity", "--num-images", "5",
                                      "--generation-steps", "2", "--generation-batch-size", "2", "--train-batch-size", "2",
                                      "--saliency-batch-size", "2", "--max-train-steps", "3", "--learning-rate", "1e-3", "--resolution",
                                      "16", "--optimizer-state", "masked", "--output-dir", str(out), "--cache-dir", str(cache), *more]
    one = run_train(args(tmp_path / "one", tmp_path / "cache1", "--gradient-accumulation-steps", "2"))
    assert one.returncode == 0, one.stderr[-3000:]
    sharded = run_train(args(tmp_path / "sharded", tmp_path / "cache2", "--fsdp"), launcher=launch(2))
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    check_sharding_record(tmp_path / "sharded", tmp_path / "one")
    assert json.loads((tmp_path / "sharded" / "erase_config.json").read_text())["sharding"]["loaded"] == \
        "each process its rows of the safetensors files"
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert len(files(tmp_path / "cache1")) == 2 * 6 and files(tmp_path / "cache1") == files(tmp_path / "cache2")
    m1, m2 = load_mask(tmp_path / "one" / "saliency_mask.safetensors"), load_mask(tmp_path / "sharded" / "saliency_mask.safetensors")
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    a, b = weights(tmp_path / "one", "transformer"), weights(tmp_path / "sharded", "transformer")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_compare_runs_on_an_erased_flux_model(tiny_flow_paths, tmp_path: Path, cli) -> None:
    """`python -m eval compare` generates with each family's own pipeline call (Flux's T5 window, its size)."""
    original, out = tiny_flow_paths["flux"], tmp_path / "out"
    assert erase(original, out, "uce").returncode == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{FORGET}\n{ANCHOR}\n")
    assert cli("compare", original, out, "--prompts", prompts, "--metrics", "nudity", "--images-per-prompt", "1",
               "--steps", "2", "--resolution", "16", "--out", tmp_path / "report") == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["erased"]["nudity"]["num_images"] == 2



@pytest.mark.parametrize("family", ["sd3", pytest.param("flux", marks=pytest.mark.slow)])
def test_the_apps_handler_on_each_flow_family(family: str, tiny_flow_paths, tmp_path: Path) -> None:
    """The demo's before / after handler (the same `generate` as eval compare, at each pipeline's default
    size: 16 px for the tiny SD3, Flux's 256 px: slow)."""
    import app

    original, out = tiny_flow_paths[family], tmp_path / family
    assert erase(original, out, "uce").returncode == 0
    demo = app.build_app(str(original), str(out), labeller=None, steps=2, guidance=3.5)
    handler = next(fn.fn for fn in demo.fns.values() if fn.name == "run")
    before, after, caption = handler(FORGET, 0, 2, 3.5, 2, False)
    assert len(before) == 2 and len(after) == 2 and "seeds 0-1" in caption


@pytest.mark.parametrize("family, method", [("sd3", "salun"), pytest.param("flux", "salun", marks=pytest.mark.slow),
                                            pytest.param("flux", "esd-x", marks=pytest.mark.slow)])
def test_worst_case_prompt_search_on_flow_families(family: str, method: str, tiny_flow_paths, tmp_path: Path) -> None:
    from test_families import check_worst_case_prompt_search

    check_worst_case_prompt_search(tiny_flow_paths[family], method, tmp_path)


def test_flux_kohya_layout_is_what_diffusers_reads_as_the_same_lora(tmp_path: Path) -> None:
    """kohya's (ComfyUI's) Flux names at FLUX.1's real widths (diffusers' converter assumes 3072): fused
    q/k/v and a single block's linear1 read back by FluxPipeline.lora_state_dict give every part's B A, a
    zero for the parts that did not change, and the final AdaLN's rows in diffusers' order."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    from erase.export.lora import LoraLayer, lora_state_dict

    g = torch.Generator().manual_seed(0)
    shapes = {"transformer_blocks.0.attn.to_k": (3072, 3072), "transformer_blocks.0.attn.add_v_proj": (3072, 3072),
              "single_transformer_blocks.1.attn.to_q": (3072, 3072), "single_transformer_blocks.1.proj_mlp": (12288, 3072),
              "context_embedder": (3072, 4096), "norm_out.linear": (6144, 3072)}
    layers = [LoraLayer("transformer", m, torch.randn(2, i, generator=g), torch.randn(o, 2, generator=g)) for m, (o, i) in shapes.items()]
    save_file(lora_state_dict(layers, "kohya", sdxl=False, flux=True), tmp_path / "kohya.safetensors")
    read = FluxPipeline.lora_state_dict(str(tmp_path / "kohya.safetensors"))
    read = read[0] if isinstance(read, tuple) else read

    def product(module: str) -> torch.Tensor:
        # diffusers 0.42.1's converter leaves Flux's top-level layers (txt_in, final_layer, ...) without the
        # `transformer.` prefix, so load_lora_weights then skips them: read either spelling here
        key = next(k for k in (f"transformer.{module}", module) if f"{k}.lora_A.weight" in read)
        return read[f"{key}.lora_B.weight"].float() @ read[f"{key}.lora_A.weight"].float()

    for layer in layers:
        assert torch.allclose(product(layer.module), layer.up @ layer.down, atol=1e-4), layer.module
    for silent in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_q_proj", "single_transformer_blocks.1.attn.to_v"):
        assert not product(silent).any(), silent


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_unlearndiffatk_runs_with_t5_reading_each_token_as_its_word(family: str, tiny_flow_paths) -> None:
    """The relaxed tokens range over CLIP's vocabulary; T5 (its own vocabulary) sees each as the mean of
    its word's T5 pieces. The attack runs its sweep through the flow schedule and reports its words."""
    from erase.sd import encode_images, generate, load_pipeline
    from erase.tokens import word_rows
    from eval.attack import AttackOptions, unlearndiffatk
    from eval.generate import Sample
    from eval.judges import Judge

    pipe = load_pipeline(str(tiny_flow_paths[family]))
    t5 = pipe.tokenizer_2 if family == "flux" else pipe.tokenizer_3
    matrix = (pipe.text_encoder_2 if family == "flux" else pipe.text_encoder_3).get_input_embeddings().weight.detach()
    ids = torch.tensor(pipe.tokenizer.convert_tokens_to_ids(["red</w>", "seven</w>"]))
    expected = torch.stack([matrix[t5("red", add_special_tokens=False).input_ids].mean(0),
                            matrix[t5("seven", add_special_tokens=False).input_ids].mean(0)])
    assert torch.allclose(word_rows(pipe.tokenizer, ids, t5, matrix), expected)
    image = generate(pipe, [FORGET], [0], 2, 3.5, height=16, width=16)[0]
    latents = encode_images(pipe, [image])
    opts = AttackOptions(k=2, iterations=2, timesteps=2, weight_decay=0.0, num_inference_steps=2)
    judge = Judge("never", lambda images: [0.0] * len(images), {"never": 0.5})
    record = unlearndiffatk(pipe, latents, Sample(0, FORGET, 0, 3.5), judge, opts,
                            lambda p: generate(pipe, [p], [0], 2, 3.5, height=16, width=16)[0])
    assert not record["attacked"] and record["checks"] == 2 and len(record["adversarial_words"]) == 2


def test_flux_single_file_is_what_diffusers_reads_back_at_flux_width() -> None:
    """Black Forest Labs' layout at FLUX.1's width (diffusers' converter fixes 3072; one double and one single
    block): diffusers' own converter gives back every tensor (q/k/v and linear1 fused, RMS norm
    scales, the final AdaLN in (shift, scale) order); a narrower Flux is refused before loading."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from erase.export.single_file_flow import flux_to_bfl

    with torch.device("meta"):
        model = FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                       num_attention_heads=24, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True)
    # each tensor its own offset plus its row index (expanded views: no memory), so that a tensor under
    # another's name, parts fused in the wrong order or halves swapped the wrong way all show
    state = {}
    for i, (k, v) in enumerate(model.state_dict().items()):
        rows = torch.arange(v.shape[0], dtype=torch.float32) + 100_000 * i
        state[k] = rows.view(-1, *[1] * (v.dim() - 1)).expand(v.shape)
    checkpoint = flux_to_bfl(state)
    assert "double_blocks.0.img_attn.qkv.weight" in checkpoint and "single_blocks.0.linear1.weight" in checkpoint
    assert "double_blocks.0.img_attn.norm.query_norm.scale" in checkpoint and "txt_in.weight" in checkpoint
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
