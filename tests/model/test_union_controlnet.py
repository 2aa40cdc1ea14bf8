"""The union ControlNet: diffusers' `ControlNetUnionModel` names and arithmetic, and the paper's zero-init identity."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetUnionModel

from controlnet.model.union_controlnet import UNION_TYPES, UnionControlNet, type_id
from controlnet.testing.tiny_models import controlled_unet_output, make_tiny_unet, randomize, tiny_inputs


def _nets(family: str, num_control_type: int = 8):
    """(ours, diffusers' with our weights), every weight random (zero layers too)."""
    torch.manual_seed(0)
    ours = randomize(
        UnionControlNet.from_unet(make_tiny_unet(family), num_control_type=num_control_type), 3
    ).eval()
    theirs = ControlNetUnionModel(**ours.diffusers_config()).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _residuals_equal(out, theirs_out) -> bool:
    down, mid = theirs_out
    return all(torch.equal(a, b) for a, b in zip(out.down, down, strict=True)) and torch.equal(out.mid, mid)


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_same_weights_same_residuals_as_diffusers(family):
    ours, theirs = _nets(family)
    x = tiny_inputs(family, batch=2)
    extra = {"added_cond_kwargs": x["added_cond_kwargs"]} if "added_cond_kwargs" in x else {}
    cond2 = torch.rand_like(x["cond"])
    args = (x["sample"], x["timestep"], x["encoder_hidden_states"])
    cases = [  # (conds, types, scale, from_multi)
        ([x["cond"]], [3], 0.7, False),
        ([x["cond"], cond2], [0, 5], [0.5, 1.2], False),
        ([x["cond"]], [7], [0.8], True),
    ]
    with torch.no_grad():
        for conds, types, scale, multi in cases:
            out = ours(*args, conds=conds, types=types, conditioning_scale=scale, from_multi=multi, **extra)
            vector = torch.zeros(2, 8)
            vector[:, types] = 1
            ref = theirs(
                *args,
                controlnet_cond=conds,
                control_type=vector,
                control_type_idx=types,
                conditioning_scale=scale,
                from_multi=multi,
                return_dict=False,
                **extra,
            )
            assert _residuals_equal(out, ref), (types, scale)


def test_state_dicts_load_strictly_both_ways():
    ours, theirs = _nets("sdxl", num_control_type=6)
    fresh = UnionControlNet.from_unet(make_tiny_unet("sdxl"), num_control_type=6)
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    assert set(fresh.state_dict()) == set(theirs.state_dict())


def test_at_initialisation_the_controlled_unet_is_the_base():
    """Eq. 3: whatever the conditions and types, the zero layers make every residual 0 and the UNet unchanged."""
    torch.manual_seed(0)
    unet = randomize(make_tiny_unet("sdxl"), 5).eval()
    net = UnionControlNet.from_unet(unet, num_control_type=8).eval()
    x = tiny_inputs("sdxl", batch=2)
    with torch.no_grad():
        out = net(
            x["sample"],
            x["timestep"],
            x["encoder_hidden_states"],
            conds=[x["cond"], torch.rand_like(x["cond"])],
            types=["canny", "depth"],
            added_cond_kwargs=x["added_cond_kwargs"],
        )
        assert torch.equal(controlled_unet_output(unet, x, out), controlled_unet_output(unet, x))
        randomize(net.controlnet_mid_block, 9)  # a zero layer moved: the output moves
        out = net(x["sample"], x["timestep"], x["encoder_hidden_states"], conds=[x["cond"]], types=[3], **{
            "added_cond_kwargs": x["added_cond_kwargs"]
        })  # fmt: skip
        moved = (controlled_unet_output(unet, x, out) - controlled_unet_output(unet, x)).abs().max()
    assert moved > 1e-3


def test_type_names_and_ids_are_checked_against_the_net():
    assert type_id("canny", 6) == 3 == type_id("MLSD", 6) == type_id(3, 6)
    assert type_id("repaint", 8) == 7 and UNION_TYPES["segment"] == 5
    with pytest.raises(ValueError, match=r"this net has 6 types \(openpose/pose 0, depth 1"):
        type_id("tile", 6)
    with pytest.raises(ValueError, match="unknown union control type 'edges'"):
        type_id("edges", 8)
    ours, _ = _nets("sd15", num_control_type=6)
    x = tiny_inputs("sd15", batch=1)
    with pytest.raises(ValueError, match="one type per condition"):
        ours(x["sample"], x["timestep"], x["encoder_hidden_states"], conds=[x["cond"]], types=[1, 2])
