"""Parity with diffusers' StableDiffusionControlNetPipeline on tiny random components."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pipeline_tiny import diffusers_sd_pipeline, to_diffusers_controlnet

from controlnet.testing.tiny_models import condition_image

PROMPT = "a red cat on the blue circle"
TOL = 1e-4


def diffusers_pipe(parts, nets):
    from diffusers import StableDiffusionControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    dnets = [to_diffusers_controlnet(n) for n in nets]
    controlnet = dnets[0] if len(dnets) == 1 else MultiControlNetModel(dnets)
    return diffusers_sd_pipeline(parts, StableDiffusionControlNetPipeline, controlnet=controlnet)


def run_both(sd_parts, n_nets, ours: dict, theirs: dict, seed=7, batch=1):
    from controlnet.generate.pipeline import ControlNetPipeline

    p = sd_parts
    nets = p["nets"][:n_nets]
    conds = [condition_image(20 + k) for k in range(n_nets)]
    mine = ControlNetPipeline(p["unet"], p["vae"], p["text_encoder"], p["tokenizer"], p["scheduler"], nets)
    a = mine(
        PROMPT, conds, steps=2, seed=seed, batch_size=batch, output_type="np", guidance_scale=6.0, **ours
    ).array
    gens = [torch.Generator().manual_seed(seed + k) for k in range(batch)]
    image = conds[0] if n_nets == 1 else conds
    b = diffusers_pipe(p, nets)(
        PROMPT,
        image=image,
        num_inference_steps=2,
        generator=gens,
        num_images_per_prompt=batch,
        output_type="np",
        guidance_scale=6.0,
        **theirs,
    ).images
    return a, b


def assert_close(a, b):
    assert a.shape == b.shape
    diff = float(np.abs(a - b).max())
    assert diff <= TOL, f"max abs difference {diff:.2e} > {TOL}"


def test_one_net(sd_parts):
    a, b = run_both(sd_parts, 1, {"control_scale": 0.9}, {"controlnet_conditioning_scale": 0.9})
    assert_close(a, b)


def test_two_nets_and_batch(sd_parts):
    a, b = run_both(
        sd_parts, 2, {"control_scale": [0.7, 1.3]}, {"controlnet_conditioning_scale": [0.7, 1.3]}, batch=2
    )
    assert_close(a, b)


def test_guess_mode_diffusers_form(sd_parts):
    a, b = run_both(
        sd_parts, 1, {"control_mode": "controlnet", "guess_mode_form": "diffusers"}, {"guess_mode": True}
    )
    assert_close(a, b)


@pytest.mark.parametrize("start,end", [(0.0, 0.5), (0.5, 1.0)])
def test_control_window(sd_parts, start, end):
    a, b = run_both(
        sd_parts,
        2,
        {"control_start": [start, 0.0], "control_end": [end, 1.0]},
        {"control_guidance_start": [start, 0.0], "control_guidance_end": [end, 1.0]},
    )
    assert_close(a, b)


def test_euler_ancestral_with_per_image_generators(sd_parts):
    """A stochastic sampler: per-step noise comes from the per-image generators, as in diffusers."""
    from diffusers import EulerAncestralDiscreteScheduler

    parts = dict(sd_parts, scheduler=EulerAncestralDiscreteScheduler.from_config(sd_parts["scheduler"].config))
    a, b = run_both(parts, 1, {"scheduler": "euler_a"}, {}, batch=2)
    assert_close(a, b)
