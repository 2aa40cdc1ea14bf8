"""ControlNet-lite (model/lite.py, paper Fig. 8c): one conv per encoder block, the ControlNet's outputs and
interface; it leaves the base untouched at step 0, and saves and loads (training: tests/train/test_lite_training.py)."""

from __future__ import annotations

import pytest
import torch

from controlnet import ControlNet
from controlnet.generate.pipeline import output_heights
from controlnet.io.api import load_controlnet
from controlnet.io.lite import is_lite_folder, load_lite, save_lite
from controlnet.model.ablations import gaussian_connections
from controlnet.model.lite import ControlNetLite
from controlnet.testing.tiny_models import controlled_unet_output, make_tiny_unet, randomize, tiny_inputs


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lite_outputs_match_the_controlnet_s_and_leave_the_base_untouched_at_step_0(family):
    unet = make_tiny_unet(family)
    inputs = tiny_inputs(family)
    full = ControlNet.from_unet(unet, hint_downscale_factor=8)
    lite = ControlNetLite.from_unet(unet, hint_downscale_factor=8)
    a, b = lite(**inputs), full(**inputs)
    assert [t.shape for t in a.down] == [t.shape for t in b.down] and a.mid.shape == b.mid.shape
    assert lite.output_strides == full.output_strides
    assert output_heights(lite, 16) == output_heights(full, 16)
    plain = controlled_unet_output(unet, inputs)
    assert torch.equal(controlled_unet_output(unet, inputs, a), plain)  # zero convolutions: y_c = y (Eq. 3)
    lite_params = sum(p.numel() for p in lite.parameters())
    assert lite_params < sum(p.numel() for p in full.parameters())  # the reference hint encoder dominates here
    gaussian = gaussian_connections(ControlNetLite.from_unet(unet, hint_downscale_factor=8), seed=0)
    assert (controlled_unet_output(unet, inputs, gaussian(**inputs)) - plain).abs().max() > 1e-4


def test_lite_ignores_time_and_prompt_and_its_gradients_reach_every_conv():
    unet = make_tiny_unet("sd15")
    inputs = tiny_inputs("sd15")
    lite = randomize(ControlNetLite.from_unet(unet, hint_downscale_factor=8))
    out = lite(**inputs)
    other = lite(
        **{
            **inputs,
            "timestep": inputs["timestep"] + 100,
            "encoder_hidden_states": torch.randn_like(inputs["encoder_hidden_states"]),
        }
    )
    assert all(torch.equal(x, y) for x, y in zip(out.down, other.down, strict=True))
    assert sum(t.square().sum() for t in [*out.down, out.mid]) > 0
    fresh = ControlNetLite.from_unet(unet, hint_downscale_factor=8)
    residual = fresh(**inputs)
    controlled_unet_output(unet, inputs, residual).square().mean().backward()
    # zero convs get gradients from their non-zero inputs at step 0 (paper Sec. 3.1)
    assert all(z.weight.grad.abs().sum() > 0 for z in fresh.controlnet_down_blocks)


def test_lite_saves_and_loads_and_load_controlnet_reads_it(tmp_path):
    unet = make_tiny_unet("sd15")
    lite = randomize(ControlNetLite.from_unet(unet, hint_downscale_factor=8))
    folder = save_lite(lite, tmp_path / "lite")
    assert is_lite_folder(folder) and not is_lite_folder(tmp_path)
    for loaded in (load_lite(folder), load_controlnet(folder, unet=unet)):
        assert isinstance(loaded, ControlNetLite)
        state = loaded.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in lite.state_dict().items())
    with pytest.raises(ValueError, match="a ControlNet-lite for skip channels"):
        load_controlnet(folder, unet=make_tiny_unet("sdxl"))
