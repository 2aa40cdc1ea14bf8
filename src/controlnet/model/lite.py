"""ControlNet-lite, the third arm of the paper's architecture ablation (Sec. 4, Fig. 8c): for experiments.

The paper replaces the trainable copy of each encoder block with a single convolution layer, keeping the zero
convolutions, to ask whether the copy's capacity matters ("ControlNet-lite" fails on weak conditions and no
prompt: the copy's pretrained features are what makes the condition understood). Here:

    h_0 = conv_in(z_t) + Z(E(c))            (as in ControlNet: the copy's conv_in, the same hint encoder E)
    h_k = SiLU(conv_k(h_{k-1}))              one 3x3 conv per skip, stride 2 where the UNet's skip halves
    out_k = Z_k(h_k)                         the same zero convolutions into the locked UNet

One output per UNet skip plus the middle (13 for SD1.5), with the UNet's channels and sizes, so the locked UNet
and the pipeline take it as they take a ControlNet. It sees neither the timestep nor the prompt: the copy's
time embedding and cross-attention are what the single convs lack. conv_in starts from the UNet's; the other
convs start from PyTorch's default initialisation (the trainer seeds it).

Saved as a folder of its own (config.json from `lite_config` + safetensors: io/lite.py), which `load_controlnet`
reads; it has no original (cldm) format and diffusers has no such class.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from controlnet.model.controlnet import ControlBase, ControlNetOutput, HintConfig, _zero_conv, encoder_skips
from controlnet.model.hint_encoder import REFERENCE_HINT_CHANNELS, SD_LATENT_DOWNSCALE, HintEncoder

LITE_CLASS_NAME = "ControlNetLite"  # `_class_name` in a saved lite net's config.json


class ControlNetLite(ControlBase):
    """One conv layer per encoder block instead of the trainable copy (paper Fig. 8c); a ControlNet's interface."""

    def __init__(
        self,
        unet_config: dict,
        hint: HintConfig,
        conv_in: nn.Conv2d,
        skip_channels: Sequence[int],
        skip_strides: Sequence[int],
    ):
        super().__init__()
        self.unet_config = dict(unet_config)
        self.hint_config = hint
        self.skip_strides = [int(s) for s in skip_strides]
        self.conv_in = conv_in
        self.controlnet_cond_embedding = HintEncoder(
            out_channels=conv_in.out_channels,
            cond_channels=hint.cond_channels,
            block_channels=hint.block_channels,
            downscale_factor=hint.downscale_factor,
        )
        # block k maps skip k-1 to skip k (block 0 is conv_in itself); the last maps to the middle's input size
        pairs = list(zip(skip_channels[:-1], skip_channels[1:], self.skip_strides[1:], strict=True))
        self.blocks = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, stride=s, padding=1) for c_in, c_out, s in pairs)
        mid = skip_channels[-1]
        self.mid_conv = nn.Conv2d(mid, mid, 3, padding=1)
        self.controlnet_down_blocks = nn.ModuleList(_zero_conv(c) for c in skip_channels)
        self.controlnet_mid_block = _zero_conv(mid)

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        cond_channels: int = 3,
        hint_block_channels: Sequence[int] = REFERENCE_HINT_CHANNELS,
        hint_downscale_factor: int = SD_LATENT_DOWNSCALE,
    ) -> ControlNetLite:
        """A fresh lite net for `unet` (its conv_in copied, the rest new), on the UNet's device and dtype."""
        hint = HintConfig(cond_channels, tuple(hint_block_channels), hint_downscale_factor)
        channels, strides = encoder_skips(unet)
        param = next(unet.parameters())
        with torch.device(param.device):
            net = cls(dict(unet.config), hint, copy.deepcopy(unet.conv_in), channels, strides)
        return net.to(dtype=param.dtype).requires_grad_(True)

    @property
    def output_strides(self) -> list[int]:
        """Per output (the skips, then the middle): 2 where it is half the size of the output before it."""
        return [*self.skip_strides, 1]

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Nothing to recompute: one conv per output stores little (kept for the trainer's interface)."""

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor,
        cond: torch.Tensor | None = None,
        conditioning_scale: float | Sequence[float] = 1.0,
        added_cond_kwargs: dict | None = None,
        hint: torch.Tensor | None = None,
    ) -> ControlNetOutput:
        """Residuals for the locked UNet. sample: (B, C_in, h, w); cond or hint as in ControlNet.forward;
        `timestep`, `encoder_hidden_states` and `added_cond_kwargs` are accepted and unused (see the module)."""
        hint = self._hint(sample, cond, hint)
        scales = self._output_scales(conditioning_scale)
        h = self.conv_in(sample) + hint  # (B, C_0, h, w)
        skips = [h]
        for conv in self.blocks:
            h = nn.functional.silu(conv(h))  # (B, C_k, h_k, w_k)
            skips.append(h)
        mid = nn.functional.silu(self.mid_conv(h))
        return self._residuals(skips, mid, scales)

    def lite_config(self) -> dict:
        """config.json of a saved lite net: enough to rebuild it without a UNet."""
        return {
            "_class_name": LITE_CLASS_NAME,
            "in_channels": self.conv_in.in_channels,
            "skip_channels": [z.in_channels for z in self.controlnet_down_blocks],
            "skip_strides": self.skip_strides,
            "conditioning_channels": self.hint_config.cond_channels,
            "conditioning_embedding_out_channels": list(self.hint_config.block_channels),
            "hint_downscale_factor": self.hint_config.downscale_factor,
            "unet_config": {k: v for k, v in self.unet_config.items() if not k.startswith("_")},
        }
