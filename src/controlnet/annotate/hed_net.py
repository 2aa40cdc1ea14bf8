"""The HED network of ControlNet 1.1 (`ControlNetHED_Apache2`, weights file ControlNetHED.pth).

A VGG-style trunk of five conv blocks (2, 2, 3, 3, 3 convs of 64, 128, 256, 512, 512 channels, ReLU, 2x2
max-pool before blocks 2-5) with a 1x1 side projection to one channel after each block (Xie & Tu,
"Holistically-Nested Edge Detection", ICCV 2015). RGB input in 0..255 minus a learned per-channel mean.
Parameter names match the released file.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

HED_BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))  # (in, out, convs)


class HedBlock(nn.Module):
    """`convs` 3x3 conv + ReLU layers, then a 1x1 projection to a one-channel side output."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_convs
        self.convs = nn.Sequential(
            *(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(channels[:-1], channels[1:], strict=True))
        )
        self.projection = nn.Conv2d(out_channels, 1, 1)

    def forward(self, x: torch.Tensor, downsample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if downsample:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)  # (B, C, h, w), (B, 1, h, w)


class HedNetwork(nn.Module):
    """(B, 3, H, W) RGB in 0..255 -> five (B, 1, H / 2^i, W / 2^i) edge logits, fine to coarse."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))  # learned mean colour subtracted from the input
        for index, (in_channels, out_channels, num_convs) in enumerate(HED_BLOCKS, start=1):
            self.add_module(f"block{index}", HedBlock(in_channels, out_channels, num_convs))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        side_outputs = []
        for index in range(1, len(HED_BLOCKS) + 1):
            h, projection = getattr(self, f"block{index}")(h, downsample=index > 1)
            side_outputs.append(projection)
        return side_outputs
