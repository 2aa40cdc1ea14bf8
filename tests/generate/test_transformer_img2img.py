"""img2img on a transformer base (issue 29 item 4): Flux through diffusers' `FluxControlNetImg2ImgPipeline`, SD3
refused by name (diffusers has no SD3 ControlNet img2img pipeline to hold parity with).

With the same seed and components, `run_job` with an init image equals diffusers' pipeline called directly (bound:
exact, `np.array_equal`); the init image and the strength act.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.generate.jobs import run_job
from controlnet.generate.options import ControlUnit, GenerationJob, GenerationOptions
from controlnet.generate.pipeline import ControlNetPipeline
from controlnet.generate.transformer_pipeline import refusals
from controlnet.model.transformer_controlnet import FluxControlNet
from controlnet.testing.tiny_transformer_bases import write_flux_base

SIZE = 32
STEPS = 2  # strength 0.5 runs the last one


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny Flux base folder and a ControlNet copied from it (zero layers made non-zero so that it acts)."""
    root = tmp_path_factory.mktemp("flux_img2img")
    base = write_flux_base(root / "flux")
    pipe = ControlNetPipeline.from_pretrained(str(base), controlnets=[])
    net = FluxControlNet.from_transformer(pipe.base.transformer, num_layers=2, num_single_layers=1)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith("controlnet_"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pipe = ControlNetPipeline.from_components(pipe.base, [net.eval().requires_grad_(False)])
    rng = np.random.default_rng(0)
    cond, init = (Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(2))
    return pipe, cond, init


def _job(cond, init, strength: float) -> GenerationJob:
    options = GenerationOptions(steps=STEPS, width=SIZE, height=SIZE, seed=3, image=init, strength=strength)
    return GenerationJob(
        prompt="a red cat", base="flux", units=[ControlUnit(model="net", image=cond)], options=options
    )


def test_flux_img2img_equals_diffusers(flux):
    from diffusers import FluxControlNetImg2ImgPipeline

    pipe, cond, init = flux
    ours = run_job(pipe, _job(cond, init, 0.5))
    b = pipe.base
    scheduler = type(b.scheduler).from_config(b.scheduler.config)
    reference = FluxControlNetImg2ImgPipeline(
        scheduler, b.vae, b.text_encoder, b.tokenizer, b.text_encoder_2, b.tokenizer_2, b.transformer,
        pipe.controlnets[0],
    )  # fmt: skip
    expected = reference(
        prompt="a red cat",
        image=init,
        control_image=cond,
        strength=0.5,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=0.0,
        generator=[torch.Generator().manual_seed(3)],
        output_type="np",
    ).images
    assert np.array_equal(ours.array, expected)  # the bound: exact
    assert ours.settings["img2img"] and ours.settings["strength"] == 0.5
    # the init image and the strength act (the tiny one-block VAE reconstructs too loosely to test "nearer the init")
    assert np.abs(run_job(pipe, _job(cond, init, 1.0)).array - ours.array).max() > 1e-3
    other = Image.fromarray(255 - np.asarray(init))
    assert np.abs(run_job(pipe, _job(cond, other, 0.5)).array - ours.array).max() > 1e-3


def test_sd3_img2img_and_inpainting_refused_by_name():
    image = Image.new("RGB", (SIZE, SIZE))
    (field, message), *_ = refusals(GenerationOptions(image=image), "sd3", 1)
    assert field == "image" and "SD3" in message and "\n" not in message
    (field, message), *_ = refusals(GenerationOptions(image=image, mask=image.convert("L")), "flux", 1)
    assert field == "mask" and "inpainting" in message
    (field, _), *_ = refusals(GenerationOptions(image=image, true_cfg_scale=2.0, negative_prompt="x"), "flux", 1)
    assert field == "true_cfg_scale"
    assert refusals(GenerationOptions(image=image), "flux", 1) == []
