"""The ablation of the paper's connection layers (Sec. 3.1; the ablation study of Sec. 4, Fig. 8): for experiments.

ControlNet joins the trainable copy to the locked model through zero convolutions: 1x1 convs with weight and bias
zero (model/controlnet.py `_zero_conv`, and the hint encoder's last conv). At step 0 they add exactly nothing, so
the base's output is untouched, while their gradients are not zero. The paper's ablation replaces them with
"standard convolution layers initialized with Gaussian weights"; `gaussian_connections` does that to a net.

A transformer ControlNet (model/transformer_controlnet.py: SD3, Flux) has the same two kinds of zero layer: the
embedding of the condition latents added to the copy's input tokens, Z(c; Theta_z1) (SD3 `pos_embed_input.proj`, a
patch-sized conv; Flux `controlnet_x_embedder`, a Linear, or an XLabs net's hint encoder's last conv), and one Linear
per copied block into the locked model, Z(.; Theta_z2) (`controlnet_blocks`, Flux also `controlnet_single_blocks`).
The ablation re-initialises those alike.

The std is LeCun's 1 / sqrt(fan_in) (unit gain: each output has the variance of one input feature; a conv's fan_in
is in_channels x kernel area, a Linear's in_features), the usual Gaussian initialisation of such a layer; the biases
stay zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def connection_layers(net: nn.Module) -> list[nn.Conv2d | nn.Linear]:
    """Every layer that is zero-initialised in a ControlNet.

    UNet nets: one 1x1 conv per output, the middle block's, and the hint encoder's last conv (Z(c) in Eq. 2 of the
    paper). Transformer nets: one Linear per copied block (Flux: double, then single blocks), then the condition's
    embedding (SD3 `pos_embed_input.proj`, Flux `controlnet_x_embedder` or XLabs' `input_hint_block.conv_out`)."""
    if hasattr(net, "controlnet_down_blocks"):
        return [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    if not hasattr(net, "controlnet_blocks"):
        raise ValueError(
            f"{type(net).__name__}: not a ControlNet (no controlnet_down_blocks or controlnet_blocks)"
        )
    layers = [*net.controlnet_blocks, *getattr(net, "controlnet_single_blocks", [])]
    if getattr(net, "pos_embed_input", None) is not None:  # SD3
        return [*layers, net.pos_embed_input.proj]
    if getattr(net, "input_hint_block", None) is not None:  # XLabs' Flux layout: its x embedder is a plain Linear
        return [*layers, net.input_hint_block.conv_out]
    return [*layers, net.controlnet_x_embedder]  # Flux


def fan_in(layer: nn.Conv2d | nn.Linear) -> int:
    """Inputs per output of `layer`: a conv's in_channels x kernel area (per group), a Linear's in_features."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return layer.weight[0].numel()


@torch.no_grad()
def gaussian_connections(net: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise `net`'s connection layers with N(0, 1 / fan_in) weights and zero biases (in place)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in connection_layers(net):
        weight = torch.randn(layer.weight.shape, generator=generator) / math.sqrt(fan_in(layer))
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.zero_()
    return net
