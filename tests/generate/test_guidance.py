"""Guess mode's per-block scales (generate/guidance.py): the reference's constant and diffusers' form."""

import pytest
import torch
from diffusers import ControlNetModel

from controlnet import ControlNet
from controlnet.generate.guidance import guess_mode_scales
from controlnet.testing.tiny_models import make_tiny_unet, randomize, tiny_inputs


def test_guess_mode_reference_constant():
    scales = guess_mode_scales(13, "reference")
    assert scales[-1] == 1.0
    assert scales[0] == pytest.approx(0.0994, abs=1e-4)  # 0.825 ** 12, the reference's "about 0.1"
    assert scales[11] == pytest.approx(0.825)
    diffusers_form = guess_mode_scales(13, "diffusers")
    assert diffusers_form[0] == pytest.approx(0.1) and diffusers_form[-1] == pytest.approx(1.0)
    assert (
        max(abs(p / q - 1) for p, q in zip(scales, diffusers_form, strict=True)) < 0.006
    )  # at most 0.59%, at the shallowest skip
    with pytest.raises(ValueError, match="guess-mode form"):
        guess_mode_scales(13, "webui")


@torch.no_grad()
def test_guess_mode_diffusers_form_matches_diffusers_controlnet():
    a = randomize(ControlNet.from_unet(make_tiny_unet("sd15")), seed=1)
    ref = ControlNetModel(**a.diffusers_config())
    ref.load_state_dict(a.state_dict())
    x = tiny_inputs("sd15")
    down, mid = ref(
        x["sample"], x["timestep"], x["encoder_hidden_states"], x["cond"], 0.8, guess_mode=True, return_dict=False
    )
    scales = [0.8 * s for s in guess_mode_scales(a.num_control_outputs, "diffusers")]
    ours = a(**x, conditioning_scale=scales)
    for p, q in zip(ours.down + [ours.mid], list(down) + [mid], strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
