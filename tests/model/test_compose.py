"""Composition of several ControlNets (paper Sec. 3.4: residuals are added) and per-block scales.

The guess-mode profile of those scales is a sampling rule: tests/generate/test_guidance.py."""

import pytest
import torch

from controlnet import ControlNet, MultiControlNet
from controlnet.model.compose import ControlTerm, compose, unet_residual_kwargs
from controlnet.testing.tiny_models import make_tiny_unet, randomize, tiny_inputs


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
    terms = [ControlTerm(a, cond=x["cond"], scale=1.0), ControlTerm(b, cond=x["cond"], scale=0.0)]
    with torch.no_grad():
        out = compose(terms, x["sample"], x["timestep"], x["encoder_hidden_states"])
        ref = a(**x)
    assert calls == []
    assert all(torch.equal(p, q) for p, q in zip(out.down + [out.mid], ref.down + [ref.mid], strict=True))
    nothing = compose(
        [ControlTerm(a, cond=x["cond"], scale=0.0)], x["sample"], x["timestep"], x["encoder_hidden_states"]
    )
    assert nothing is None and unet_residual_kwargs(nothing) == {}


@torch.no_grad()
def test_only_mid_control_feeds_the_middle_block_only():
    _, a, _ = _two_nets()
    x = tiny_inputs("sd15")
    out = compose([ControlTerm(a, cond=x["cond"])], x["sample"], x["timestep"], x["encoder_hidden_states"], True)
    assert all(torch.count_nonzero(d) == 0 for d in out.down)
    torch.testing.assert_close(out.mid, a(**x).mid, atol=0, rtol=0)


def test_bad_composition_inputs():
    unet, a, b = _two_nets()
    x = tiny_inputs("sd15")
    multi = MultiControlNet([a, b])
    with pytest.raises(ValueError, match="2 condition images for 2|1 condition images for 2"):
        multi(x["sample"], x["timestep"], x["encoder_hidden_states"], conds=[x["cond"]])
    with pytest.raises(ValueError, match="scale must be >= 0"):
        ControlTerm(a, cond=x["cond"], scale=-0.5)
    with pytest.raises(ValueError, match="block_scales has 2 values"):
        ControlTerm(a, cond=x["cond"], block_scales=[1.0, 1.0])
    xl = ControlNet.from_unet(make_tiny_unet("sdxl"))
    with pytest.raises(ValueError, match="disagree on the number of outputs"):
        MultiControlNet([a, xl])
