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
        weight = weight.to(grad_out.dtype)
        # dL/dx is the transposed convolution of dL/dy with W (bitwise torch's own input gradient on CPU, tests).
        # Called directly it is faster than convolution_backward on a stand-in for x (the stand-in's strides cost
        # a layout change, and a 1x1 kernel returned NCHW gradients into a channels_last graph); at the built-in
        # size a locked step has 29 such convolutions, so this is a visible share of the step.
        if _is_pointwise(weight, stride, padding, groups) and grad_out.is_contiguous(
            memory_format=torch.channels_last
        ):
            # a 1x1 kernel in channels_last: one matmul over the pixels, (N*H*W, C_out) @ (C_out, C_in), which
            # torch would otherwise send to its slow (im2col) transposed convolution
            n, c_out, h, w = grad_out.shape
            grad_in = grad_out.permute(0, 2, 3, 1).reshape(-1, c_out) @ weight.view(c_out, -1)
            return grad_in.view(n, h, w, -1).permute(0, 3, 1, 2), None, None, None, None, None, None
        out_size = grad_out.shape[-2:]
        # output_padding gives back the rows and columns a strided convolution dropped
        output_padding = [
            shape[2 + i]
            - ((out_size[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[2 + i] - 1) + 1)
            for i in range(2)
        ]
        grad_in = F.conv_transpose2d(grad_out, weight, None, stride, padding, output_padding, groups, dilation)
        return grad_in, None, None, None, None, None, None


def _is_pointwise(weight: torch.Tensor, stride, padding, groups: int) -> bool:
    """A 1x1, unstrided, unpadded, ungrouped kernel: the convolution is a matmul over channels."""
    return weight.shape[-2:] == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) and groups == 1


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
