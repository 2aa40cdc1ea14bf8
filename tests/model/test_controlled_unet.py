"""The trained model feeds the locked UNet exactly the residuals inference feeds it (one residual sum)."""

import pytest
import torch

from controlnet import ControlNet
from controlnet.model.compose import ControlTerm, compose, unet_residual_kwargs
from controlnet.model.controlled_unet import ControlledUNet
from controlnet.testing.tiny_models import make_tiny_unet, randomize, tiny_inputs


@pytest.mark.parametrize("only_mid_control", [False, True])
@torch.no_grad()
def test_controlled_unet_predicts_what_the_unet_predicts_with_composed_residuals(only_mid_control):
    unet = randomize(make_tiny_unet("sd15"), seed=0)
    net = randomize(ControlNet.from_unet(unet), seed=1)
    x = tiny_inputs("sd15")
    timesteps = x["timestep"]  # (B,)
    got = ControlledUNet(net, unet, only_mid_control)(
        x["sample"], timesteps, x["encoder_hidden_states"], x["cond"]
    )
    residuals = compose(
        [ControlTerm(net, cond=x["cond"])], x["sample"], timesteps, x["encoder_hidden_states"], only_mid_control
    )
    want = unet(x["sample"], timesteps, x["encoder_hidden_states"], **unet_residual_kwargs(residuals)).sample
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    plain = unet(x["sample"], timesteps, x["encoder_hidden_states"]).sample
    assert not torch.equal(got, plain)  # the randomized net does steer: the comparison above is not vacuous
