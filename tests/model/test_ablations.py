"""The connection-layer ablation (model/ablations.py): Gaussian-initialised connections change the base at step 0,
zero convolutions do not, on UNet and transformer (SD3, Flux) ControlNets; the trainer option picks them for a fresh
net only."""

from __future__ import annotations

import math

import pytest
import torch

from controlnet import ControlNet
from controlnet.model.ablations import connection_layers, fan_in, gaussian_connections
from controlnet.model.transformer_controlnet import FluxControlNet, SD3ControlNet
from controlnet.testing.tiny_models import controlled_unet_output, make_tiny_unet, tiny_inputs
from controlnet.testing.tiny_transformers import (
    base_inputs,
    flux_inputs,
    make_flux_transformer,
    make_sd3_transformer,
    sd3_inputs,
)
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


TRANSFORMERS = {
    # family: (base maker, fresh net on that base, inputs, names of the zero-initialised layers)
    "sd3": (
        make_sd3_transformer,
        lambda base: SD3ControlNet.from_transformer(base, num_layers=3),
        sd3_inputs,
        [*(f"controlnet_blocks.{i}" for i in range(3)), "pos_embed_input.proj"],
    ),
    "flux": (
        make_flux_transformer,
        lambda base: FluxControlNet.from_transformer(base, num_layers=2, num_single_layers=2),
        flux_inputs,
        [
            *(f"controlnet_blocks.{i}" for i in range(2)),
            *(f"controlnet_single_blocks.{i}" for i in range(2)),
            "controlnet_x_embedder",
        ],
    ),
}


@pytest.mark.parametrize("family", TRANSFORMERS)
@torch.no_grad()
def test_gaussian_connections_of_a_transformer_net_change_exactly_its_zero_layers_and_the_step_0_output(family):
    make_base, make_net, make_inputs, zero_layers = TRANSFORMERS[family]
    base, inputs = make_base(), make_inputs()
    zero = make_net(base)
    names = {module: name for name, module in zero.named_modules()}
    assert [names[layer] for layer in connection_layers(zero)] == zero_layers
    gaussian = gaussian_connections(make_net(base), seed=0)
    before, after = zero.state_dict(), gaussian.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{name}.weight" for name in zero_layers}  # the weights of those layers, nothing else
    assert all(not before[k].any() for k in changed)  # ... which were zero
    for layer in connection_layers(gaussian):
        assert not layer.bias.any()
        assert abs(layer.weight.std().item() * math.sqrt(fan_in(layer)) - 1) < 0.35  # N(0, 1/fan_in)
    plain = base(**base_inputs(inputs)).sample
    assert torch.equal(base(**base_inputs(inputs), **zero.residual_kwargs(zero(**inputs))).sample, plain)
    moved = base(**base_inputs(inputs), **gaussian.residual_kwargs(gaussian(**inputs))).sample
    assert (moved - plain).abs().mean() > 1e-2 * plain.abs().mean()
    again = gaussian_connections(make_net(base), seed=0).state_dict()
    assert all(torch.equal(after[k], again[k]) for k in changed)  # seeded
    other = gaussian_connections(make_net(base), seed=1).state_dict()
    assert not any(torch.equal(after[k], other[k]) for k in changed)


def test_connection_layers_of_something_else_is_a_clear_error():
    with pytest.raises(ValueError, match="Linear: not a ControlNet"):
        connection_layers(torch.nn.Linear(2, 2))
