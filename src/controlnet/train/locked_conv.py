"""Convolutions of the locked UNet that keep no input for backward.

Paper Sec. 3.2: the locked UNet's decoder is back-propagated through (the control residuals enter its skip
connections) but its weights get no gradient. The input gradient of a convolution, dL/dx = conv_transpose(dL/dy, W),
needs only the weight; the input x is needed only for the weight gradient dL/dW. torch's autograd keeps x for every
convolution anyway (one backward formula serves all three gradients), so each locked decoder convolution holds its
input until backward: 9% of the activations of an SD1.5-sized step at 256 px (219.8 -> 199.7 MB,
benchmarks/training.py). `LockedConv2d` keeps the weight alone and computes dL/dx as that transposed convolution.
Its output and gradients equal `nn.Conv2d`'s (bitwise in tests/train/test_locked_conv.py, on CPU, for the tiny
test UNets and for SD1.5-sized layers at 1 and 2 threads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _InputGradOnlyConv2d(torch.autograd.Function):
    """y = conv2d(x, W, b) with W and b locked: saves W for dL/dx and nothing of x."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.geometry
        # dL/dx is the transposed convolution of dL/dy with W: bitwise torch's own input gradient (the one
        # nn.Conv2d's backward computes from the real x), for the tiny test UNets and SD1.5-sized layers alike
        # (tests/train/test_locked_conv.py). Called directly, it is faster than convolution_backward on a
        # zero-stride stand-in for x, used before: at the built-in size a 1x1 layer took 104 vs 69 us that way and
        # returned its gradient in NCHW inside a channels_last graph. (A matmul for 1x1 layers was faster still at
        # that size, but not bitwise at SD1.5's.)
        # output_padding gives back the rows and columns a strided convolution dropped.
        out_size = grad_out.shape[-2:]
        output_padding = [
            shape[2 + i]
            - ((out_size[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[2 + i] - 1) + 1)
            for i in range(2)
        ]
        grad_in = F.conv_transpose2d(
            grad_out, weight.to(grad_out.dtype), None, stride, padding, output_padding, groups, dilation
        )
        return grad_in, None, None, None, None, None, None


class LockedConv2d(nn.Conv2d):
    """`nn.Conv2d` whose forward drops the saved input when only the input needs a gradient; otherwise (trainable
    weights, no graph, padding other than zeros given as numbers) it is `nn.Conv2d` unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        locked = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        numeric_zero_padding = self.padding_mode == "zeros" and not isinstance(self.padding, str)  # not "same"
        if not (locked and x.requires_grad and torch.is_grad_enabled() and numeric_zero_padding):
            return super().forward(x)
        return _InputGradOnlyConv2d.apply(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


def lock_convolutions(module: nn.Module) -> int:
    """Turn every plain `nn.Conv2d` under `module` into a `LockedConv2d` in place (same parameters, same state dict);
    returns how many. Convolutions whose weights are trainable behave exactly as before."""
    count = 0
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = LockedConv2d
            count += 1
    return count
