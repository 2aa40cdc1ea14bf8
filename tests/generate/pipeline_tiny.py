"""Helpers for the pipeline tests (fixtures are in conftest.py): diffusers' own pipelines and ControlNets over the
tiny components of controlnet.testing.tiny_models, and a random built-in base saved to a folder."""

from __future__ import annotations

from pathlib import Path

import torch

from controlnet.model.controlnet import ControlNet


def to_diffusers_controlnet(net: ControlNet):
    from diffusers import ControlNetModel

    model = ControlNetModel(**net.diffusers_config())
    model.load_state_dict(net.state_dict())
    return model.eval()


def diffusers_sd_pipeline(parts: dict, pipeline_class=None, **components):
    """diffusers' SD pipeline (`pipeline_class`, default StableDiffusionPipeline) over the tiny `parts`."""
    if pipeline_class is None:
        from diffusers import StableDiffusionPipeline as pipeline_class
    pipe = pipeline_class(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_random_builtin_base(folder: Path, words) -> dict:
    """A random base of the built-in architecture saved as `controlnet world export-base` writes it; its parts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from controlnet.builtin import base as builtin_base
    from controlnet.builtin.config import BaseModelConfig
    from controlnet.builtin.text import build_text_encoder, build_tokenizer

    config = BaseModelConfig()
    tokenizer = build_tokenizer(words, config.text.max_length)
    torch.manual_seed(0)
    parts = {
        "unet": UNet2DConditionModel(**builtin_base.unet_kwargs(config)),
        "vae": AutoencoderKL(**builtin_base.vae_kwargs(config)),
        "text_encoder": build_text_encoder(config.text, tokenizer),
        "tokenizer": tokenizer,
    }
    builtin_base.save_builtin_base(parts, config, folder)
    return parts


def base_args(saved, out, *extra):
    """`controlnet generate` on the saved tiny base and ControlNet (the `saved` fixture), 2 steps, into `out`."""
    return [
        "generate",
        "--base",
        str(saved / "base"),
        "--controlnet",
        str(saved / "cn_diffusers"),
        "--steps",
        "2",
        "--out",
        str(out),
        *extra,
    ]
