"""ControlNet-lite's folder (the ablation's net, model/lite.py): config.json with `_class_name` ControlNetLite and
one safetensors file. `load_controlnet` reads it; it has no original (cldm) format and diffusers has no such class.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from controlnet.atomic import atomic_path
from controlnet.io.safe_load import write_state_dict
from controlnet.model.controlnet import HintConfig
from controlnet.model.lite import LITE_CLASS_NAME, ControlNetLite

LITE_WEIGHTS = "diffusion_pytorch_model.safetensors"


def is_lite_folder(path: str | Path) -> bool:
    """True for a folder written by `save_lite`."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == LITE_CLASS_NAME
    except (json.JSONDecodeError, AttributeError):
        return False


def save_lite(net: ControlNetLite, folder: str | Path) -> Path:
    """Write `net` as config.json + safetensors into `folder`, atomically (the folder appears whole or none)."""
    folder = Path(folder)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        write_state_dict(net.state_dict(), tmp / LITE_WEIGHTS)
        (tmp / "config.json").write_text(json.dumps(net.lite_config(), indent=2, default=str) + "\n")
    return folder


def load_lite(folder: str | Path, dtype: torch.dtype | None = None) -> ControlNetLite:
    """Read a folder written by `save_lite`."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    hint = HintConfig(
        config["conditioning_channels"],
        tuple(config["conditioning_embedding_out_channels"]),
        config["hint_downscale_factor"],
    )
    channels = config["skip_channels"]
    with torch.device("meta"):
        conv_in = nn.Conv2d(config["in_channels"], channels[0], 3, padding=1)
        net = ControlNetLite(config["unet_config"], hint, conv_in, channels, config["skip_strides"])
    net.load_state_dict(load_file(str(folder / LITE_WEIGHTS)), strict=True, assign=True)
    return net.to(dtype=dtype) if dtype is not None else net
