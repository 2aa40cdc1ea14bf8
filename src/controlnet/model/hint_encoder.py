"""The condition ("hint") encoder E(.) that maps an image-space condition c_i to a feature map c_f.

Paper, Sec. 3.3: "we use a tiny network E(.) ... to encode an image-space condition c_i into a feature space
conditioning vector c_f", so that a 512x512 condition matches SD's 64x64 latent. The released checkpoints follow
the reference code rather than the paper's prose (four 4x4 convs): eight 3x3 convs with SiLU between them,
channels 16,16,32,32,96,96,256 -> model channels, stride 2 at the 3rd, 5th and 7th conv, and the last conv
zero-initialised. Parameter names equal diffusers' `ControlNetConditioningEmbedding`:

    conv_in  (C_cond -> 16)                          reference input_hint_block.0
    blocks.0 (16 -> 16), blocks.1 (16 -> 32, s2)     reference input_hint_block.2, .4
    blocks.2 (32 -> 32), blocks.3 (32 -> 96, s2)     reference input_hint_block.6, .8
    blocks.4 (96 -> 96), blocks.5 (96 -> 256, s2)    reference input_hint_block.10, .12
    conv_out (256 -> model channels), zero init      reference input_hint_block.14

`downscale_factor` chooses how many of the channel-changing convs stride by 2 (the last log2(factor) of them),
so the same eight-conv layout serves a 4x latent base or a pixel-space base (factor 1). Only factor 8 with the
default channels loads into diffusers' `ControlNetModel`, which hard-codes stride 2 at every transition.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

REFERENCE_HINT_CHANNELS = (16, 32, 96, 256)
SD_LATENT_DOWNSCALE = 8  # 512 px condition -> 64 px latent


class HintEncoder(nn.Module):
    """Condition image (B, C_cond, H, W) in [0, 1] -> feature map (B, C_model, H / f, W / f)."""

    def __init__(
        self,
        out_channels: int,
        cond_channels: int = 3,
        block_channels: tuple[int, ...] = REFERENCE_HINT_CHANNELS,
        downscale_factor: int = SD_LATENT_DOWNSCALE,
    ):
        super().__init__()
        num_transitions = len(block_channels) - 1
        num_strided = int(round(math.log2(downscale_factor))) if downscale_factor >= 1 else -1
        if 2**num_strided != downscale_factor or num_strided > num_transitions:
            raise ValueError(
                f"downscale_factor={downscale_factor} must be a power of two <= 2**{num_transitions} "
                f"(one stride-2 conv per channel transition of block_channels={tuple(block_channels)})"
            )
        self.downscale_factor = downscale_factor
        self.conv_in = nn.Conv2d(cond_channels, block_channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for i in range(num_transitions):
            c_in, c_out = block_channels[i], block_channels[i + 1]
            stride = 2 if i >= num_transitions - num_strided else 1
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=stride))
        # Zero-initialised: at step 0 the condition contributes nothing (paper Sec. 3.1, Eq. 3).
        self.conv_out = nn.Conv2d(block_channels[-1], out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(cond))  # (B, 16, H, W)
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)  # (B, C_model, H / f, W / f)
