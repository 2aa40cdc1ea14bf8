"""Fixtures for pipeline tests; the tiny components themselves are built in pipeline_tiny.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # lets test modules import pipeline_tiny

from pipeline_tiny import (  # noqa: E402
    TINY_UNET_CONFIGS,
    make_controlnet,
    make_scheduler,
    make_text_encoder,
    make_tokenizer,
    make_unet,
    make_vae,
)

from controlnet.pipeline import ControlNetPipeline  # noqa: E402


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
