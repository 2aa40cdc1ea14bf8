"""Create ControlNets from a base model, and move them between models fine-tuned from one base.

`init` is what the reference `tool_add_control.py` does: the trainable copy starts as the base UNet's encoder,
the hint encoder and zero convolutions are new (paper Sec. 3.1/3.2).

`transfer` follows the paper's remark that a ControlNet works with community models fine-tuned from the same
base (Sec. 4 / Fig. 10) and the reference's `tool_transfer_control.py` recipe: for every copied encoder weight,
    control_new = control + (community - base)
so the copy carries the community model's fine-tuning delta; ControlNet-only layers are kept as they are.
"""

from __future__ import annotations

import torch

from controlnet.errors import CheckpointError
from controlnet.model.controlnet import ControlNet


def init_controlnet(unet: torch.nn.Module, **hint_options) -> ControlNet:
    """A fresh ControlNet whose copy holds `unet`'s encoder weights (zero convs at zero)."""
    return ControlNet.from_unet(unet, **hint_options)


def transfer_controlnet(
    control: ControlNet, base_unet: torch.nn.Module, community_unet: torch.nn.Module
) -> ControlNet:
    """Return a copy of `control` moved from `base_unet` to `community_unet` by weight difference.

    The difference is taken first, so a community model equal to its base returns `control` bit for bit.
    """
    base = base_unet.state_dict()
    community = community_unet.state_dict()
    if set(base) != set(community) or any(base[k].shape != community[k].shape for k in base):
        raise CheckpointError(
            "base and community UNets differ in architecture; transfer needs models fine-tuned from the same base"
        )
    state = control.state_dict()
    shared = [k for k in state if k in base]
    if not shared:
        raise CheckpointError(
            "the ControlNet shares no weights with the base UNet; is it a ControlNet of this base?"
        )
    mismatched = [k for k in shared if state[k].shape != base[k].shape]
    if mismatched:
        raise CheckpointError(f"ControlNet and base UNet disagree on {mismatched[0]} (different base family?)")
    new_state = {}
    for key, value in state.items():
        if key in base:
            delta = community[key].to(torch.float32) - base[key].to(torch.float32)
            new_state[key] = (value.to(torch.float32) + delta).to(value.dtype)
        else:
            new_state[key] = value.clone()
    moved = ControlNet.from_unet(community_unet, **_hint_options(control))
    moved.load_state_dict(new_state, strict=True)
    return moved.to(control.dtype)


def _hint_options(net: ControlNet) -> dict:
    hint = net.hint_config
    return {
        "cond_channels": hint.cond_channels,
        "hint_block_channels": hint.block_channels,
        "hint_downscale_factor": hint.downscale_factor,
    }
