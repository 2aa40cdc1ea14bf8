"""Composition of several ControlNets (paper Sec. 3.4: residuals are added) and per-block scales."""

import pytest
import torch
from diffusers import ControlNetModel

from controlnet import ControlNet, MultiControlNet
from controlnet.model.compose import ControlUnit, compose, guess_mode_scales, unet_residual_kwargs

from tiny import make_tiny_unet, randomize, tiny_inputs


def _two_nets():
    unet = make_tiny_unet("sd15")
    return unet, randomize(ControlNet.from_unet(unet), seed=1), randomize(ControlNet.from_unet(unet), seed=2)


@torch.no_grad()
def test_two_nets_add_their_residuals():
    _, a, b = _two_nets()
    x = tiny_inputs("sd15")
    cond_b = torch.rand_like(x["cond"])
    out_a = a(**x, conditioning_scale=0.5)
    out_b = b(**{**x, "cond": cond_b}, conditioning_scale=1.5)
    multi = MultiControlNet([a, b])(
        x["sample"], x["timestep"], x["encoder_hidden_states"], conds=[x["cond"], cond_b], scales=[0.5, 1.5]
    )
    for got, ra, rb in zip(
        multi.down + [multi.mid], out_a.down + [out_a.mid], out_b.down + [out_b.mid], strict=True
    ):
        torch.testing.assert_close(got, ra + rb, atol=0, rtol=0)


def test_net_at_scale_zero_is_not_evaluated_and_all_zero_means_no_control():
    _, a, b = _two_nets()
    calls = []
    b.register_forward_pre_hook(lambda *_: calls.append("b"))
    x = tiny_inputs("sd15")
    units = [ControlUnit(a, cond=x["cond"], scale=1.0), ControlUnit(b, cond=x["cond"], scale=0.0)]
    with torch.no_grad():
        out = compose(units, x["sample"], x["timestep"], x["encoder_hidden_states"])
        ref = a(**x)
    assert calls == []
    assert all(torch.equal(p, q) for p, q in zip(out.down + [out.mid], ref.down + [ref.mid], strict=True))
    nothing = compose(
        [ControlUnit(a, cond=x["cond"], scale=0.0)], x["sample"], x["timestep"], x["encoder_hidden_states"]
    )
    assert nothing is None and unet_residual_kwargs(nothing) == {}


@torch.no_grad()
def test_only_mid_control_feeds_the_middle_block_only():
    _, a, _ = _two_nets()
    x = tiny_inputs("sd15")
    out = compose([ControlUnit(a, cond=x["cond"])], x["sample"], x["timestep"], x["encoder_hidden_states"], True)
    assert all(torch.count_nonzero(d) == 0 for d in out.down)
    torch.testing.assert_close(out.mid, a(**x).mid, atol=0, rtol=0)


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
    _, a, _ = _two_nets()
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


def test_bad_composition_inputs():
    unet, a, b = _two_nets()
    x = tiny_inputs("sd15")
    multi = MultiControlNet([a, b])
    with pytest.raises(ValueError, match="2 condition images for 2|1 condition images for 2"):
        multi(x["sample"], x["timestep"], x["encoder_hidden_states"], conds=[x["cond"]])
    with pytest.raises(ValueError, match="scale must be >= 0"):
        ControlUnit(a, cond=x["cond"], scale=-0.5)
    with pytest.raises(ValueError, match="block_scales has 2 values"):
        ControlUnit(a, cond=x["cond"], block_scales=[1.0, 1.0])
    xl = ControlNet.from_unet(make_tiny_unet("sdxl"))
    with pytest.raises(ValueError, match="disagree on the number of outputs"):
        MultiControlNet([a, xl])
