"""The connection-layer ablation (model/ablations.py): Gaussian-initialised connections change the base at step 0,
zero convolutions do not; the trainer option picks them for a fresh net only."""

from __future__ import annotations

import math

import pytest
import torch

from controlnet import ControlNet
from controlnet.model.ablations import connection_layers, gaussian_connections
from controlnet.testing.tiny_models import controlled_unet_output, make_tiny_unet, tiny_inputs
from controlnet.train.config import ModelConfig


def test_gaussian_connections_change_the_base_output_at_step_0():
    unet = make_tiny_unet("sd15")
    inputs = tiny_inputs("sd15")
    plain = controlled_unet_output(unet, inputs)
    zero = ControlNet.from_unet(unet, hint_downscale_factor=8)
    assert torch.equal(controlled_unet_output(unet, inputs, zero(**inputs)), plain)
    gaussian = gaussian_connections(ControlNet.from_unet(unet, hint_downscale_factor=8), seed=0)
    changed = controlled_unet_output(unet, inputs, gaussian(**inputs))
    assert (changed - plain).abs().mean() > 1e-3 * plain.abs().mean()


def test_gaussian_connections_have_unit_gain_and_zero_bias():
    net = gaussian_connections(ControlNet.from_unet(make_tiny_unet("sd15"), hint_downscale_factor=8), seed=0)
    layers = connection_layers(net)
    assert len(layers) == net.num_control_outputs + 1  # every output, plus the hint encoder's last conv
    for conv in layers:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.bias.abs().max() == 0
        assert abs(conv.weight.std().item() * math.sqrt(fan_in) - 1) < 0.35  # small layers: loose bound
    again = gaussian_connections(ControlNet.from_unet(make_tiny_unet("sd15"), hint_downscale_factor=8), seed=0)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(layers, connection_layers(again), strict=True))


def test_config_takes_the_choice_for_fresh_nets_only():
    assert ModelConfig(connection_init="gaussian").connection_init == "gaussian"
    with pytest.raises(ValueError, match="model.connection_init='uniform': expected one of zero, gaussian"):
        ModelConfig(connection_init="uniform")
    with pytest.raises(ValueError, match="only for a fresh ControlNet"):
        ModelConfig(connection_init="gaussian", controlnet="builtin:fill")
