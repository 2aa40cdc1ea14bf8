"""Resize modes, samplers by name, control windows and guidance arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.generate.control_images import condition_tensor, resize_image
from controlnet.generate.guidance import apply_cfg, in_window
from controlnet.generate.samplers import SAMPLERS, canonical_sampler_name, make_scheduler, sampler_display_name
from controlnet.testing.tiny_models import condition_image


def halves(width=128, height=64) -> Image.Image:
    """Left half red, right half blue, a green 2-px column at each edge."""
    a = np.zeros((height, width, 3), dtype=np.uint8)
    a[:, : width // 2, 0] = 255
    a[:, width // 2 :, 2] = 255
    a[:, :2] = (0, 255, 0)
    a[:, -2:] = (0, 255, 0)
    return Image.fromarray(a)


def test_just_resize_stretches():
    out = np.asarray(resize_image(halves(), 64, 64, "Just Resize"))
    assert out.shape == (64, 64, 3)
    assert out[32, 10, 0] > 200 and out[32, 54, 2] > 200  # both halves kept, squeezed
    assert out[32, 0, 1] > 100  # the green edge column survives


def test_crop_and_resize_cuts_the_overflow():
    out = np.asarray(resize_image(halves(), 64, 64, "crop_and_resize"))
    assert out.shape == (64, 64, 3)
    assert out[32, 0, 1] < 10 and out[32, 63, 1] < 10  # green edges cropped away
    assert out[32, 5, 0] > 200 and out[32, 58, 2] > 200


def test_resize_and_pad_keeps_everything_and_pads_black():
    out = np.asarray(resize_image(halves(), 64, 64, "Resize and Fill"))
    assert out.shape == (64, 64, 3)
    assert out[:16].max() == 0 and out[48:].max() == 0  # 128x64 -> 64x32 content, black bars above and below
    assert out[32, 0, 1] > 100 and out[32, 10, 0] > 200


def test_condition_tensor_is_unit_range_rgb():
    t = condition_tensor(condition_image(1, 32), 16, 16)
    assert t.shape == (1, 3, 16, 16) and t.dtype == torch.float32 and t.min() >= 0 and t.max() <= 1


@pytest.mark.parametrize(
    "name,key",
    [("DPM++ 2M Karras", "dpmpp_2m_karras"), ("Euler a", "euler_a"), ("UniPC", "unipc"), ("ddim", "ddim")],
)
def test_sampler_names(name, key):
    assert canonical_sampler_name(name) == key


@pytest.mark.parametrize("key", sorted(SAMPLERS))
def test_every_sampler_keeps_the_noise_schedule(key):
    base = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
    }
    sched = make_scheduler(key, base)
    assert type(sched).__name__ == SAMPLERS[key].class_name
    assert sched.config.beta_end == 0.012 and sched.config.beta_schedule == "scaled_linear"
    assert sampler_display_name(sched) == SAMPLERS[key].display_name
    sched.set_timesteps(3)
    assert len(sched.timesteps) == 3


def test_karras_switch():
    assert make_scheduler("dpmpp_2m_karras", {}).config.use_karras_sigmas is True
    assert make_scheduler("dpmpp_2m", {"use_karras_sigmas": True}).config.use_karras_sigmas is False


def test_window_convention():
    # 4 steps, window [0, 0.5]: steps 0 and 1; [0.5, 1]: steps 2 and 3; [0.3, 1]: steps 2 and 3
    assert [in_window(i, 4, 0.0, 0.5) for i in range(4)] == [True, True, False, False]
    assert [in_window(i, 4, 0.5, 1.0) for i in range(4)] == [False, False, True, True]
    assert [in_window(i, 4, 0.3, 1.0) for i in range(4)] == [False, False, True, True]


def test_cfg_formula():
    eps = torch.tensor([[1.0], [3.0]])  # [uncond, cond]
    assert apply_cfg(eps, 7.5).item() == 1.0 + 7.5 * 2.0


def test_samplers_run_in_the_pipeline(pixel_pipe):
    outs = {
        k: pixel_pipe("a cat", [condition_image(1, 16)], steps=2, scheduler=k, output_type="np").array
        for k in SAMPLERS
    }
    assert all(np.isfinite(o).all() for o in outs.values())
    assert np.abs(outs["ddim"] - outs["euler_a"]).max() > 1e-3


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm(sd_parts):
    """clip_skip=k: hidden states k layers before the last, then CLIP's final layer norm (as the web UI and diffusers).

    (diffusers 0.42.1's own clip_skip path fails with transformers 5's CLIPTextModel, so this is not a parity test.)
    """
    from controlnet.generate.prompts import encode_single

    tok, enc = sd_parts["tokenizer"], sd_parts["text_encoder"]
    ids = tok(["a red cat"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        out = enc(ids, output_hidden_states=True)
        expected = enc.final_layer_norm(out.hidden_states[-2])
    assert torch.equal(encode_single(tok, enc, ["a red cat"]).context, out.last_hidden_state)
    assert torch.allclose(encode_single(tok, enc, ["a red cat"], clip_skip=1).context, expected)
    assert not torch.allclose(expected, out.last_hidden_state)
