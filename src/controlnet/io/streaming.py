"""Checkpoint tools in bounded memory: one tensor read, computed and written at a time.

`controlnet convert | init | transfer` used to load every model whole (three at once for transfer: 10.9 GB RSS
at SD1.5 size). Here a model is opened lazily (`LazyWeights`: names, shapes and dtypes as meta tensors; the data
read on demand), every check the in-memory path makes is made on the meta tensors, and the output is written
tensor by tensor (`write_safetensors_streamed`). The files are the ones `save_controlnet` writes for the network
the in-memory path builds: same keys, order, dtypes, bits and metadata (tests/io/test_streaming.py compares them).

Key renames are not re-implemented: diffusers' `convert_ldm_unet_checkpoint` and our `original_keys` rules run on
dicts of meta tensors; they only rename (no reshape, no concatenation for the UNet), so each output entry is the
same meta object as the file's entry, and `LazyWeights.read` finds the file's tensor behind it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from controlnet.io.api import (
    _read_config,
    build_unet,
    controlnet_file_layout,
    locate_unet,
    open_controlnet,
    unet_file_layout,
)
from controlnet.io.formats import (
    CONFIG_NAME,
    DIFFUSERS_WEIGHT_NAMES,
)
from controlnet.io.original_keys import ORIGINAL_CONTROL_PREFIX
from controlnet.io.safe_load import (
    SAFETENSORS_SUFFIXES,
    LazyWeights,
    check_strict,
    write_safetensors_streamed,
    write_state_dict,
)
from controlnet.model.controlnet import ControlNet
from controlnet.model.hint_encoder import HintEncoder

Phase = Callable[[str], None]  # told the name of each phase as it starts (the CLI's progress bar)


def _no_phase(name: str) -> None:
    pass


@dataclass
class UNetSource:
    """A base UNet opened lazily: diffusers names -> the file's tensors as meta tensors, and its config."""

    weights: LazyWeights
    state: dict[str, torch.Tensor]
    config: dict

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.weights.read(self.state[name]).to(dtype)

    def __enter__(self) -> UNetSource:
        return self

    def __exit__(self, *exc) -> None:
        self.weights.close()


def open_unet(
    path: str | os.PathLike,
    config: dict | str | os.PathLike | None = None,
    ema: bool | None = None,
    flags: dict | None = None,
) -> UNetSource:
    """Open what `load_unet(path, config, ema=ema)` loads, without reading its tensors; the same checks and errors
    (`flags`: how the EMA option is spelled in messages, see `io.ema`)."""
    path, folder = locate_unet(path)
    config = _read_config(config)
    if folder is not None:
        config = json.loads((folder / CONFIG_NAME).read_text())  # from_pretrained reads the folder's own config
        weights = LazyWeights(next(folder / n for n in DIFFUSERS_WEIGHT_NAMES if (folder / n).is_file()))
    else:
        weights = LazyWeights(path)
    state = weights.meta
    try:
        if folder is None:
            # diffusers' converter, run on meta tensors: it only renames (were it to build new tensors, the
            # streamed path could not find their data)
            known = {id(v) for v in state.values()}
            state, config = unet_file_layout(path, state, config, ema, flags)
            assert all(id(v) in known for v in state.values()), "convert_ldm_unet_checkpoint made tensors"
        check_strict(build_unet(config, device="meta").state_dict(), state, f"UNet in {path.name}")
    except BaseException:
        weights.close()
        raise
    return UNetSource(weights, state, config)


def fresh_layers(template: ControlNet) -> dict[str, torch.Tensor]:
    """The layers `ControlNet.from_unet` creates new, with the values it gives them (in the template's dtype).

    The hint encoder is drawn from torch's global generator exactly as `ControlNet.__init__` draws it (the same
    constructor call, before any other draw), so under one seed it equals `from_unet`'s; zero convs are zeros
    (paper Sec. 3.1). Marked duplication of those two lines of `ControlNet.__init__`; tests/io/test_streaming.py
    checks it against `from_unet`.
    """
    hint = template.hint_config
    encoder = HintEncoder(
        out_channels=template.conv_in.out_channels,
        cond_channels=hint.cond_channels,
        block_channels=hint.block_channels,
        downscale_factor=hint.downscale_factor,
    )
    state = {f"controlnet_cond_embedding.{k}": v for k, v in encoder.state_dict().items()}
    for name, value in template.state_dict().items():
        if name.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")):
            state[name] = torch.zeros(value.shape, dtype=value.dtype)
    dtype = template.dtype
    return {k: v.to(dtype) for k, v in state.items()}


def write_controlnet_streamed(
    template: ControlNet,
    produce: Callable[[str], torch.Tensor],
    path: str | os.PathLike,
    format: str = "diffusers",
    dtype: torch.dtype | None = None,
    prefix: str = ORIGINAL_CONTROL_PREFIX,
) -> Path:
    """Write what `save_controlnet(net, path, format, dtype, prefix)` writes, for the network `template` (meta)
    filled by `produce(name)` (our parameter name -> its tensor, called once per name).

    `.safetensors` outputs are streamed; an original-format `.pth` is written by torch.save, which needs every
    tensor at once (one model in memory: the output's).
    """
    path = Path(path)
    layout = controlnet_file_layout(template, path, format, prefix)
    own = template.state_dict()

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    names = {key: name for name, key in layout.names.items()}
    specs = {
        key: torch.empty(own[name].shape, dtype=cast(own[name]).dtype, device="meta")
        for key, name in names.items()
    }

    def write_weights(target: Path) -> None:
        if target.suffix.lower() in SAFETENSORS_SUFFIXES:
            write_safetensors_streamed(specs, lambda key: cast(produce(names[key])), target, layout.metadata)
        else:
            write_state_dict({key: cast(produce(name)) for key, name in names.items()}, target, layout.metadata)

    layout.write(path, write_weights)
    return path


def convert_controlnet_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    format: str,
    config: dict | str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    prefix: str = ORIGINAL_CONTROL_PREFIX,
    phase: Phase = _no_phase,
) -> ControlNet:
    """`save_controlnet(load_controlnet(src, config=config), dst, format, dtype, prefix)`, one tensor at a time.

    Returns the network's template (meta device: names, shapes, configuration).
    """
    phase(f"reading {Path(src).name}")
    with open_controlnet(src, config=config) as source:
        phase(f"writing {format} {Path(dst).name}")
        model_dtype = torch.get_default_dtype()  # what load_controlnet(src) builds without a UNet
        write_controlnet_streamed(
            source.template,
            lambda name: source.weights.read(source.state[name]).to(model_dtype),
            dst,
            format,
            dtype,
            prefix,
        )
    return source.template
