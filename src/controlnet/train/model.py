"""The locked UNet's decoder, which training may unlock (the reference code's `sd_locked=False`).

Paper Sec. 4: "for larger datasets... unlock the decoder": with `sd_locked=False` the UNet decoder's weights are
trained beside the ControlNet. The trained model itself, eps_theta, is `controlnet.model.controlled_unet`.
"""

from __future__ import annotations

import torch
from torch import nn

# The reference code's sd_locked=False trains `output_blocks` and `out` of the LDM UNet: diffusers' names.
DECODER_MODULES = ("up_blocks", "conv_norm_out", "conv_out")


def decoder_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """Parameters of the UNet's decoder (up blocks and output head)."""
    params = []
    for name in DECODER_MODULES:
        module = getattr(unet, name, None)
        if module is not None:
            params += list(module.parameters())
    return params


def decoder_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The decoder's entries of the UNet state dict (what sd_locked=False changes)."""
    return {k: v for k, v in unet.state_dict().items() if k.split(".")[0] in DECODER_MODULES}
