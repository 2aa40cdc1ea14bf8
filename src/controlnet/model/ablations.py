"""The ablation of the paper's connection layers (Sec. 3.1; the ablation study of Sec. 4, Fig. 8): for experiments.

ControlNet joins the trainable copy to the locked model through zero convolutions: 1x1 convs with weight and bias
zero (model/controlnet.py `_zero_conv`, and the hint encoder's last conv). At step 0 they add exactly nothing, so
the base's output is untouched, while their gradients are not zero. The paper's ablation replaces them with
"standard convolution layers initialized with Gaussian weights"; `gaussian_connections` does that to a net.

The std is LeCun's 1 / sqrt(fan_in) (unit gain for a 1x1 conv: each output has the variance of one input feature),
the usual Gaussian initialisation of a conv layer; the biases stay zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def connection_layers(net: nn.Module) -> list[nn.Conv2d]:
    """Every layer that is zero-initialised in a ControlNet: one per output, the middle block's, and the hint
    encoder's last conv (Z(c) in Eq. 2 of the paper)."""
    return [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]


@torch.no_grad()
def gaussian_connections(net: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise `net`'s connection layers with N(0, 1 / fan_in) weights and zero biases (in place)."""
    generator = torch.Generator().manual_seed(seed)
    for conv in connection_layers(net):
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        weight = torch.randn(conv.weight.shape, generator=generator) / math.sqrt(fan_in)
        conv.weight.copy_(weight.to(conv.weight.dtype))
        conv.bias.zero_()
    return net
