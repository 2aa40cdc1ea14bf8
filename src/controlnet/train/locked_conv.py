"""Convolutions of the locked UNet that keep no input for backward.

Paper Sec. 3.2: the locked UNet's decoder is back-propagated through (the control residuals enter its skip
connections) but its weights get no gradient. The input gradient of a convolution, dL/dx = conv_transpose(dL/dy, W),
needs only the weight; the input x is needed only for the weight gradient dL/dW. torch's autograd keeps x for every
convolution anyway (one backward formula serves all three gradients), so each locked decoder convolution holds its
input until backward: 9% of the activations of an SD1.5-sized step at 256 px (219.8 -> 199.7 MB,
benchmarks/training.py). `LockedConv2d` keeps the weight alone and hands torch's convolution backward the input's
shape instead of its values, as torch.nn.grad.conv2d_input does. Its output and gradients equal `nn.Conv2d`'s
(bitwise in tests/train/test_locked_conv.py, on CPU).
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
        # the kernel reads the input's shape only: a zero-stride view of one element stands in for x
        shape_only = grad_out.new_zeros(()).expand(shape)
        grad_in = torch.ops.aten.convolution_backward(
            grad_out, shape_only, weight.to(grad_out.dtype), None, stride, padding, dilation, False, [0, 0], groups,
            [True, False, False],
        )[0]  # fmt: skip
        return grad_in, None, None, None, None, None, None


class LockedConv2d(nn.Conv2d):
    """`nn.Conv2d` whose forward drops the saved input when only the input needs a gradient; otherwise (trainable
    weights, no graph, padding other than zeros given as numbers) it is `nn.Conv2d` unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        locked = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        numeric_zero_padding = self.padding_mode == "zeros" and not isinstance(self.padding, str)  # not "same"
        if not (locked and x.requires_grad and torch.is_grad_enabled() and numeric_zero_padding):
            return super().forward(x)
        return _InputGradOnlyConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                          self.groups)  # fmt: skip


def lock_convolutions(module: nn.Module) -> int:
    """Turn every plain `nn.Conv2d` under `module` into a `LockedConv2d` in place (same parameters, same state dict);
    returns how many. Convolutions whose weights are trainable behave exactly as before."""
    count = 0
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = LockedConv2d
            count += 1
    return count
