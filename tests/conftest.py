"""Shared fixtures: a tiny Stable Diffusion pipeline built from configs (as in diffusers' tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
if os.environ.get("PYTEST_XDIST_WORKER"):  # parallel workers share the cores: one thread each, and their subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `cuda` run only where CUDA is; CI on the CPU reports them as skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (none on this machine)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


# core tests run on every device this machine has
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def build_tiny_pipeline(seed: int = 0):
    """UNet (32, 64), a two-layer CLIP text encoder, a tiny VAE and a DDIM scheduler: 16x16 images."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erase.digits import build_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        sample_size=32,
    )
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(seed: int = 0):
    """SDXL's structure in miniature (as diffusers' own SDXL tests build it): two text encoders
    whose hidden states are concatenated (32 + 32), a pooled projection, and a UNet with
    `text_time` added conditioning; 16x16 images."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from erase.digits import build_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        sample_size=32, force_upcast=True, scaling_factor=0.13025,
    )
    tokenizer = build_tokenizer()
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(config), text_encoder_2=CLIPTextModelWithProjection(config), tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(), unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def build_tiny_sd2_pipeline(seed: int = 0):
    """SD 2.x's distinctions in miniature: a v-prediction scheduler, linear attention projections."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    pipe = build_tiny_pipeline(seed)
    torch.manual_seed(seed + 1)
    pipe.unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
    )
    pipe.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                   set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    pipe.register_modules(unet=pipe.unet, scheduler=pipe.scheduler)
    return pipe


def _tiny_flow_vae():
    """A 4-channel VAE with SD3 / Flux's latent shift (shift_factor, as their VAEs have)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        sample_size=32, scaling_factor=1.5, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False,
    )


def _tiny_clip(tokenizer, projection: bool, width: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=width, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tiny_t5(tokenizer, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def build_tiny_sd3_pipeline(seed: int = 0, t5: bool = True):
    """SD3.5's structure in miniature (as diffusers' SD3 tests build it): an MMDiT of 2 joint blocks (the
    first with SD3.5-medium's second image self-attention, `attn2`; RMS q/k norms), CLIP-L + CLIP-G
    (pooled projections 32 + 48) and, optionally, T5; flow matching with shift 3; 16x16 images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from erase.digits import build_t5_tokenizer, build_tokenizer

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=80,
                                        caption_projection_dim=32, pooled_projection_dim=80, pos_embed_max_size=16,
                                        dual_attention_layers=(0,), qk_norm="rms_norm")
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    # CLIP-G wider than CLIP-L, and CLIP-L's projection the identity, as in SD3 (single-file loading relies on both)
    text_encoder, text_encoder_2 = _tiny_clip(tokenizer, True), _tiny_clip(tokenizer_2, True, width=48)
    with torch.no_grad():
        text_encoder.text_projection.weight.copy_(torch.eye(32))
    tokenizer_3 = build_t5_tokenizer() if t5 else None
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_tiny_flow_vae(),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=_tiny_t5(tokenizer_3, 80) if t5 else None, tokenizer_3=tokenizer_3,
    )


def build_tiny_flux_pipeline(seed: int = 0, guidance: bool = True):
    """FLUX.1's structure in miniature: 1 double and 1 single block, CLIP-L pooled + T5 (a 77-token
    window), 2x2-packed latents (16 = 4 x 4 channels), the resolution-dependent shift, and the
    guidance embedding of FLUX.1-dev (`guidance=False`: schnell); 16x16 images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from erase.digits import build_t5_tokenizer, build_tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))
    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_tiny_flow_vae(), text_encoder=_tiny_clip(tokenizer, False),
                        tokenizer=tokenizer, text_encoder_2=_tiny_t5(tokenizer_2), tokenizer_2=tokenizer_2)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    """A tiny random pipeline saved as a diffusers folder (safetensors)."""
    path = tmp_path_factory.mktemp("tiny-sd") / "pipeline"
    build_tiny_pipeline().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_flow_paths(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD3 (with and without T5), FLUX.1-dev-like (guidance embedding) and schnell-like pipelines
    saved as diffusers folders, built once for every test that erases a flow-matching transformer."""
    root = tmp_path_factory.mktemp("flow")
    builds = {"sd3": lambda: build_tiny_sd3_pipeline(), "sd3-no-t5": lambda: build_tiny_sd3_pipeline(t5=False),
              "flux": lambda: build_tiny_flux_pipeline(), "schnell": lambda: build_tiny_flux_pipeline(guidance=False)}
    for name, build in builds.items():
        build().save_pretrained(root / name, safe_serialization=True)
    return {name: root / name for name in builds}


@pytest.fixture(scope="module")
def digits():
    """scikit-learn digits with the classifier path's split (seed 0)."""
    from erase.classifier import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def tiny_family_paths(tmp_path_factory) -> dict[str, Path]:
    """Tiny SDXL and SD 2.x (v-prediction) pipelines saved as diffusers folders."""
    root = tmp_path_factory.mktemp("families")
    paths = {"sdxl": root / "sdxl", "sd2": root / "sd2"}
    build_tiny_sdxl_pipeline().save_pretrained(paths["sdxl"], safe_serialization=True)
    build_tiny_sd2_pipeline().save_pretrained(paths["sd2"], safe_serialization=True)
    return paths


@pytest.fixture(scope="session")
def digits_pipe():
    """The embedded digits pipeline, frozen (the attacks' tests share it)."""
    from erase.sd import load_pipeline

    pipe = load_pipeline("digits")
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    return pipe


@pytest.fixture(scope="module")
def one_thread():
    """Two shared cores: one thread is several times faster than two fighting other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli():
    """Run `python -m eval` in this process; undo the Accelerate state and log levels it sets."""
    import diffusers
    import transformers
    from accelerate import PartialState

    fresh = not PartialState._shared_state
    levels = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    from eval.__main__ import main

    yield lambda *argv: main([str(a) for a in argv])
    if fresh:
        PartialState._reset_state()
    diffusers.utils.logging.set_verbosity(levels[0])
    transformers.utils.logging.set_verbosity(levels[1])


@pytest.fixture(scope="module")
def detector():
    from nudenet import NudeDetector

    return NudeDetector()


@pytest.fixture
def i2p_csv(tmp_path) -> Path:
    import csv

    from eval_support import I2P_ROWS

    path = tmp_path / "i2p.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(I2P_ROWS[0]))
        writer.writeheader()
        writer.writerows(I2P_ROWS)
    return path


def free_port() -> int:
    """A TCP port free on this machine now, for a launched run's rendezvous (tests may run in parallel)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
