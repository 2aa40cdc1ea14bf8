"""Parity with diffusers' StableDiffusionXLControlNetPipeline on a tiny SDXL-style base."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pipeline_tiny import to_diffusers_controlnet

from controlnet.generate.pipeline import ControlNetPipeline
from controlnet.testing.tiny_models import condition_image

PROMPT = "a blue dog on the red circle"


def run_both(p, ours: dict, theirs: dict, seed=3):
    from diffusers import StableDiffusionXLControlNetPipeline

    cond = condition_image(40)
    mine = ControlNetPipeline(
        p["unet"],
        p["vae"],
        p["text_encoder"],
        p["tokenizer"],
        p["scheduler"],
        p["nets"],
        text_encoder_2=p["text_encoder_2"],
        tokenizer_2=p["tokenizer_2"],
    )
    a = mine(PROMPT, [cond], steps=2, seed=seed, output_type="np", guidance_scale=5.0, **ours).array
    ref = StableDiffusionXLControlNetPipeline(
        vae=p["vae"],
        text_encoder=p["text_encoder"],
        text_encoder_2=p["text_encoder_2"],
        tokenizer=p["tokenizer"],
        tokenizer_2=p["tokenizer_2"],
        unet=p["unet"],
        controlnet=to_diffusers_controlnet(p["nets"][0]),
        scheduler=p["scheduler"],
        add_watermarker=False,
    )
    ref.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    b = ref(
        PROMPT, image=cond, num_inference_steps=2, generator=gen, output_type="np", guidance_scale=5.0, **theirs
    )
    return a, b.images


@pytest.mark.parametrize(
    "ours,theirs",
    [
        ({"control_scale": 0.8}, {"controlnet_conditioning_scale": 0.8}),
        ({"negative_prompt": "a dog"}, {"negative_prompt": "a dog"}),
        (
            {"control_mode": "controlnet", "guess_mode_form": "diffusers", "control_end": 0.5},
            {"guess_mode": True, "control_guidance_end": 0.5},
        ),
    ],
    ids=["scale", "negative_prompt", "guess_mode_window"],
)
def test_sdxl_matches_diffusers(sdxl_parts, ours, theirs):
    a, b = run_both(sdxl_parts, ours, theirs)
    assert a.shape == b.shape == (1, 64, 64, 3)
    diff = float(np.abs(a - b).max())
    assert diff <= 1e-4, f"max abs difference {diff:.2e}"
