"""Fixtures for pipeline tests; the tiny components themselves are built by controlnet.testing.tiny_models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # lets test modules import pipeline_tiny

from pipeline_tiny import diffusers_sd_pipeline  # noqa: E402

from controlnet.generate.pipeline import ControlNetPipeline  # noqa: E402
from controlnet.io.api import save_controlnet  # noqa: E402
from controlnet.testing.tiny_models import (
    TINY_UNET_CONFIGS,
    condition_image,
    make_controlnet,
    make_scheduler,
    make_text_encoder,
    make_tokenizer,
    make_unet,
    make_vae,
)


@pytest.fixture(scope="session")
def sd_parts(tmp_path_factory) -> dict:
    """Components of a tiny SD1.x-style base (shared by tests; never mutate them)."""
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("tok"))
    unet = make_unet("sd15")
    return {
        "unet": unet,
        "vae": make_vae(),
        "text_encoder": make_text_encoder(tokenizer, TINY_UNET_CONFIGS["sd15"]["cross_attention_dim"], seed=4),
        "tokenizer": tokenizer,
        "scheduler": make_scheduler(),
        "nets": [make_controlnet(unet, seed=11), make_controlnet(unet, seed=12)],
    }


@pytest.fixture
def sd_pipe(sd_parts):
    """Our pipeline on the tiny SD1.x base with two ControlNets."""
    p = sd_parts
    return ControlNetPipeline(p["unet"], p["vae"], p["text_encoder"], p["tokenizer"], p["scheduler"], p["nets"])


@pytest.fixture(scope="session")
def sdxl_parts(tmp_path_factory) -> dict:
    """Components of a tiny SDXL-style base: two CLIP encoders (the second with a projection), text_time UNet."""
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("tok1"))
    tokenizer_2 = make_tokenizer(tmp_path_factory.mktemp("tok2"))
    unet = make_unet("sdxl", seed=5)
    cfg = TINY_UNET_CONFIGS["sdxl"]
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return {
        "unet": unet,
        "vae": make_vae(seed=6),
        "text_encoder": make_text_encoder(tokenizer, 16, seed=7),
        "text_encoder_2": make_text_encoder(
            tokenizer_2, cfg["cross_attention_dim"] - 16, seed=8, projection=pooled
        ),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": make_scheduler(),
        "nets": [make_controlnet(unet, seed=13)],
    }


@pytest.fixture(scope="session")
def pixel_parts(tmp_path_factory) -> dict:
    """A pixel-space base (no VAE: the UNet denoises RGB in [-1, 1]) with a 1x hint encoder; 16 px images."""
    from diffusers import UNet2DConditionModel

    from controlnet.model.controlnet import ControlNet
    from controlnet.testing.tiny_models import randomize

    tokenizer = make_tokenizer(tmp_path_factory.mktemp("tokp"))
    config = dict(TINY_UNET_CONFIGS["sd15"], sample_size=16, in_channels=3, out_channels=3)
    torch.manual_seed(9)
    unet = randomize(UNet2DConditionModel(**config), seed=109).eval()
    torch.manual_seed(10)
    net = randomize(ControlNet.from_unet(unet, hint_downscale_factor=1), seed=110).eval()
    return {
        "unet": unet,
        "vae": None,
        "text_encoder": make_text_encoder(tokenizer, TINY_UNET_CONFIGS["sd15"]["cross_attention_dim"], seed=4),
        "tokenizer": tokenizer,
        "scheduler": make_scheduler(),
        "nets": [net],
    }


@pytest.fixture
def pixel_pipe(pixel_parts):
    p = pixel_parts
    return ControlNetPipeline(p["unet"], None, p["text_encoder"], p["tokenizer"], p["scheduler"], p["nets"])


@pytest.fixture(scope="session")
def saved(sd_parts, tmp_path_factory):
    """The tiny SD base as a diffusers folder, net 0 as a diffusers folder, net 1 as an original file, 2 images."""
    p = sd_parts
    root = tmp_path_factory.mktemp("saved")
    diffusers_sd_pipeline(p).save_pretrained(root / "base")
    save_controlnet(p["nets"][0], root / "cn_diffusers", format="diffusers")
    save_controlnet(p["nets"][1], root / "cn_original.safetensors", format="original")
    condition_image(1).save(root / "cond1.png")
    condition_image(2).save(root / "cond2.png")
    return root
