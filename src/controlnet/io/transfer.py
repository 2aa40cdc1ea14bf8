"""Create ControlNets from a base model, and move them between models fine-tuned from one base.

`init` is what the reference `tool_add_control.py` does: the trainable copy starts as the base UNet's encoder,
the hint encoder and zero convolutions are new (paper Sec. 3.1/3.2).

`transfer` follows the paper's remark that a ControlNet works with community models fine-tuned from the same
base (Sec. 4 / Fig. 10) and the reference's `tool_transfer_control.py` recipe: for every copied encoder weight,
    control_new = control + (community - base)
so the copy carries the community model's fine-tuning delta; ControlNet-only layers are kept as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from controlnet.errors import CheckpointError
from controlnet.io.api import build_unet, open_controlnet
from controlnet.io.original_keys import ORIGINAL_CONTROL_PREFIX
from controlnet.io.streaming import Phase, _no_phase, fresh_layers, open_unet, write_controlnet_streamed
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
    state = control.state_dict()
    _check_transfer(state, base, community)
    new_state = {}
    for key, value in state.items():
        new_state[key] = _moved(value, base[key], community[key]) if key in base else value.clone()
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


def _check_transfer(control: dict, base: dict, community: dict) -> None:
    """Refuse models that were not fine-tuned from one base (dicts of tensors: meta tensors will do)."""
    if set(base) != set(community) or any(base[k].shape != community[k].shape for k in base):
        raise CheckpointError(
            "base and community UNets differ in architecture; transfer needs models fine-tuned from the same base"
        )
    shared = [k for k in control if k in base]
    if not shared:
        raise CheckpointError(
            "the ControlNet shares no weights with the base UNet; is it a ControlNet of this base?"
        )
    mismatched = [k for k in shared if control[k].shape != base[k].shape]
    if mismatched:
        raise CheckpointError(f"ControlNet and base UNet disagree on {mismatched[0]} (different base family?)")


def _moved(value: torch.Tensor, base: torch.Tensor, community: torch.Tensor) -> torch.Tensor:
    """control + (community - base) in float32, back in the control's dtype (the difference first: exact when
    community == base)."""
    delta = community.to(torch.float32) - base.to(torch.float32)
    return (value.to(torch.float32) + delta).to(value.dtype)


# ----------------------------------------------------------------------------------------------------------------
# The same on files, one tensor at a time (bounded memory: see streaming.py).


def init_controlnet_file(
    base: str | os.PathLike,
    dst: str | os.PathLike,
    format: str = "diffusers",
    config: dict | str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    phase: Phase = _no_phase,
    ema: bool | None = None,
    flags: dict | None = None,
    **hint_options,
) -> ControlNet:
    """`save_controlnet(init_controlnet(load_unet(base, config, ema=ema), **hint_options), dst, format, dtype)`,
    streamed (`flags`: the EMA option's names in messages). `dtype` None keeps the base UNet's own dtype (an fp16
    base gives an fp16 ControlNet, as convert and transfer keep their source's; float32 when the UNet mixes dtypes).

    The base UNet's encoder tensors are read and written one at a time; the new layers are drawn as `from_unet`
    draws them. Returns the network's template (meta device).
    """
    phase(f"reading the UNet of {Path(base).name}")
    with open_unet(base, config, ema, flags) as unet:
        if dtype is None:
            floats = {v.dtype for v in unet.state.values() if v.dtype.is_floating_point}
            dtype = floats.pop() if len(floats) == 1 else None
        phase("copying its encoder")
        template = ControlNet.from_unet(build_unet(unet.config, device="meta"), **hint_options)
        fresh = fresh_layers(template)
        model_dtype = torch.get_default_dtype()  # what load_unet builds

        def produce(name: str) -> torch.Tensor:
            return fresh[name] if name in fresh else unet.read(name, model_dtype)

        phase(f"writing {format} {Path(dst).name}")
        write_controlnet_streamed(template, produce, dst, format, dtype)
    return template


def transfer_controlnet_file(
    control: str | os.PathLike,
    base: str | os.PathLike,
    community: str | os.PathLike,
    dst: str | os.PathLike,
    format: str = "diffusers",
    config: dict | str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    phase: Phase = _no_phase,
    ema: bool | None = None,
    flags: dict | None = None,
) -> ControlNet:
    """`save_controlnet(transfer_controlnet(load_controlnet(control, unet=b), b, c), dst, format, dtype)` with
    b, c = `load_unet(base, config, ema=ema)`, `load_unet(community, config, ema=ema)` (one choice for both: the
    difference is taken between weights of one kind), one tensor at a time: for every name, the three files'
    tensors are read, combined and written before the next. Returns the result's template (meta).
    """
    phase(f"reading the base UNet of {Path(base).name}")
    with open_unet(base, config, ema, flags) as b:
        phase(f"reading the community UNet of {Path(community).name}")
        with open_unet(community, config, ema, flags) as c:
            phase(f"reading the ControlNet {Path(control).name}")
            with open_controlnet(control, config=b.config) as source:
                _check_transfer(source.state, b.state, c.state)
                hint = source.template.hint_config
                template = ControlNet.from_unet(
                    build_unet(c.config, device="meta"),
                    cond_channels=hint.cond_channels,
                    hint_block_channels=hint.block_channels,
                    hint_downscale_factor=hint.downscale_factor,
                )
                model_dtype = torch.get_default_dtype()  # the in-memory path's models: load_unet's dtype

                def produce(name: str) -> torch.Tensor:
                    value = source.weights.read(source.state[name]).to(model_dtype)
                    if name in b.state:
                        value = _moved(value, b.read(name, model_dtype), c.read(name, model_dtype))
                    return value

                phase(f"adding the community - base difference, writing {format} {Path(dst).name}")
                write_controlnet_streamed(template, produce, dst, format, dtype, ORIGINAL_CONTROL_PREFIX)
    return template
