"""eps_theta(z_t, t, c_t, c_f): a ControlNet steering a locked UNet, as one module (so DDP wraps one thing).

Paper Sec. 3.2 / Eq. 2 / Fig. 3b: the UNet is locked; the trainable copy of its encoder feeds residuals through
zero convolutions into the UNet's skip connections and middle block. Because the locked parameters have
requires_grad=False and the noisy latent does not require grad, autograd builds no graph through the locked encoder
and middle block at all: the backward pass runs through the locked decoder (activation gradients only, no weight
gradients) into the zero convolutions and the copy. Training may unlock the decoder (train/model.py).
"""

from __future__ import annotations

import torch
from torch import nn

from controlnet.model.compose import mid_only, unet_residual_kwargs
from controlnet.model.controlnet import ControlNet


class ControlledUNet(nn.Module):
    """eps_theta(z_t, t, c_t, c_f): ControlNet residuals into the locked UNet (paper Eq. 2 / Fig. 3b)."""

    def __init__(self, controlnet: ControlNet, unet: nn.Module, only_mid_control: bool = False):
        super().__init__()
        self.controlnet, self.unet, self.only_mid_control = controlnet, unet, only_mid_control

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        cond: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """noisy: (B, C, h, w); timesteps: (B,); context: (B, L, D); cond: (B, C_cond, H, W) in [0, 1];
        added_cond: SDXL's {"text_embeds": (B, D_pooled), "time_ids": (B, 6)}, fed to both networks."""
        out = self.controlnet(noisy, timesteps, context, cond=cond, added_cond_kwargs=added_cond)
        if self.only_mid_control:
            out = mid_only(out)
        return self.unet(
            noisy,
            timesteps,
            encoder_hidden_states=context,
            added_cond_kwargs=added_cond,
            **unet_residual_kwargs(out),
        ).sample  # (B, C, h, w)
