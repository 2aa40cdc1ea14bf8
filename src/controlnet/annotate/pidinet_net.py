"""PiDiNet, the edge network behind ControlNet 1.1's "softedge_pidinet" (weights file table5_pidinet.pth).

Su et al., "Pixel Difference Networks for Efficient Edge Detection" (ICCV 2021), configuration "carv4"
with dilation 24 and spatial attention (the paper's Table 5 model): 16 depthwise pixel-difference
layers cycling central (cd), angular (ad), radial (rd) differences and vanilla (cv) convolutions, four
stages of 60/120/240/240 channels, and per stage a dilation module (CDCM), attention (CSAM) and 1x1
reduction, fused by a 1x1 classifier. Parameter names match the released file (after `module.`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

PDC_KINDS = ("cd", "ad", "rd", "cv") * 4  # "carv4": the kind of layer i (init block, then 15 blocks)
BASE_CHANNELS = 60  # PiDiNet(inplane=60)
FUSE_CHANNELS = 24  # dil=24: channels of the dilation/attention/reduction branch
ATTENTION_CHANNELS = 4  # CSAM mid channels
CDCM_DILATIONS = (5, 7, 9, 11)
# Angular difference: each of the 3x3 taps minus its clockwise neighbour (row-major indices).
CLOCKWISE_NEIGHBOUR = (3, 0, 1, 6, 4, 2, 7, 8, 5)
# Radial difference: a 5x5 kernel whose outer-ring taps hold weights[1:] and inner-ring taps their negatives.
RD_OUTER = (0, 2, 4, 10, 14, 20, 22, 24)
RD_INNER = (6, 7, 8, 11, 13, 16, 17, 18)


def pixel_difference_kernel(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) learned weights -> the plain kernel the pixel-difference convolution equals."""
    out_channels, in_channels = weight.shape[:2]
    if kind == "cv":
        return weight
    if kind == "cd":  # sum_i w_i (x_i - x_center): the centre tap loses the sum of all weights
        kernel = weight.clone()
        kernel[:, :, 1, 1] -= weight.sum(dim=(2, 3))
        return kernel
    flat = weight.reshape(out_channels, in_channels, 9)
    if kind == "ad":  # sum_i w_i (x_i - x_clockwise(i))
        return (flat - flat[:, :, list(CLOCKWISE_NEIGHBOUR)]).reshape(weight.shape)
    if kind == "rd":  # sum_i w_i (x_outer(i) - x_inner(i)) on a 5x5 support
        kernel = weight.new_zeros(out_channels, in_channels, 25)
        kernel[:, :, list(RD_OUTER)] = flat[:, :, 1:]
        kernel[:, :, list(RD_INNER)] = -flat[:, :, 1:]
        return kernel.reshape(out_channels, in_channels, 5, 5)
    raise ValueError(f"kind: got {kind!r}; expected one of cv, cd, ad, rd")


class PixelDifferenceConv(nn.Module):
    """A 3x3 pixel-difference convolution ("rd" reads a 5x5 neighbourhood), no bias."""

    def __init__(self, kind: str, in_channels: int, out_channels: int, groups: int = 1):
        super().__init__()
        self.kind, self.groups = kind, groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = pixel_difference_kernel(self.kind, self.weight)
        return F.conv2d(x, kernel, padding=kernel.shape[-1] // 2, groups=self.groups)


class PDCBlock(nn.Module):
    """Depthwise pixel-difference conv -> ReLU -> 1x1 conv, plus a residual (max-pool + 1x1 when striding)."""

    def __init__(self, kind: str, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.conv1 = PixelDifferenceConv(kind, in_channels, in_channels, groups=in_channels)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        y = self.conv2(F.relu(self.conv1(x)))
        return y + (self.shortcut(x) if self.stride > 1 else x)


class CDCM(nn.Module):
    """Compact dilation convolution module: ReLU, 1x1, then four dilated 3x3 convs summed."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1)
        for index, dilation in enumerate(CDCM_DILATIONS, start=1):
            conv = nn.Conv2d(out_channels, out_channels, 3, dilation=dilation, padding=dilation, bias=False)
            self.add_module(f"conv2_{index}", conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))
        return sum(getattr(self, f"conv2_{i}")(x) for i in range(1, len(CDCM_DILATIONS) + 1))


class CSAM(nn.Module):
    """Compact spatial attention: x * sigmoid(conv3x3(conv1x1(relu(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, ATTENTION_CHANNELS, 1)
        self.conv2 = nn.Conv2d(ATTENTION_CHANNELS, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class MapReduce(nn.Module):
    """1x1 conv to a single edge-logit channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    """(B, 3, H, W) BGR in [0, 1] -> (B, 1, H, W) edge probability (the fused output)."""

    def __init__(self):
        super().__init__()
        c = BASE_CHANNELS
        stages = ((c, c, 3), (c, 2 * c, 4), (2 * c, 4 * c, 4), (4 * c, 4 * c, 4))  # (in, out, blocks)
        self.init_block = PixelDifferenceConv(PDC_KINDS[0], 3, c)
        layer = 1
        for stage, (in_channels, out_channels, num_blocks) in enumerate(stages, start=1):
            for block in range(1, num_blocks + 1):
                strided = stage > 1 and block == 1
                block_in = in_channels if block == 1 else out_channels
                module = PDCBlock(PDC_KINDS[layer], block_in, out_channels, stride=2 if strided else 1)
                self.add_module(f"block{stage}_{block}", module)
                layer += 1
        self.stage_blocks = [num_blocks for _, _, num_blocks in stages]
        self.dilations = nn.ModuleList(CDCM(out, FUSE_CHANNELS) for _, out, _ in stages)
        self.attentions = nn.ModuleList(CSAM(FUSE_CHANNELS) for _ in stages)
        self.conv_reduces = nn.ModuleList(MapReduce(FUSE_CHANNELS) for _ in stages)
        self.classifier = nn.Conv2d(len(stages), 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2:]
        h = self.init_block(x)
        edges = []
        for stage, num_blocks in enumerate(self.stage_blocks, start=1):
            for block in range(1, num_blocks + 1):
                h = getattr(self, f"block{stage}_{block}")(h)
            i = stage - 1
            edge = self.conv_reduces[i](self.attentions[i](self.dilations[i](h)))  # (B, 1, h_i, w_i)
            edges.append(F.interpolate(edge, (height, width), mode="bilinear", align_corners=False))
        return torch.sigmoid(self.classifier(torch.cat(edges, dim=1)))  # (B, 1, H, W)
