"""Inspect a weights file or diffusers folder without building a model."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from controlnet.io.formats import DIFFUSERS_WEIGHT_NAMES, Inspection, inspect_state_dict
from controlnet.io.safe_load import LazyWeights

DIFFUSERS_SUBFOLDERS = ("", "controlnet", "unet")
DIFFUSERS_FOLDER_LAYOUT = "diffusers folder (config.json + diffusion_pytorch_model.safetensors)"


def weights_file(path: str | os.PathLike) -> Path:
    """The weights file of `path`: itself, or the diffusers weights inside a model folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"not found: {path}")
    if path.is_file():
        return path
    for sub in DIFFUSERS_SUBFOLDERS:
        for name in DIFFUSERS_WEIGHT_NAMES:
            if (path / sub / name).is_file():
                return path / sub / name
    raise FileNotFoundError(
        f"{path}: folder holds no diffusion_pytorch_model.safetensors (nor in controlnet/, unet/)"
    )


def inspect_path(path: str | os.PathLike) -> Inspection:
    """What a file or folder holds, from names, shapes and dtypes only: a `.safetensors` header, a zip `.pth`'s
    pickle (memory-mapped, no tensor data read); legacy pickles and `.xz` files are read whole."""
    with LazyWeights(weights_file(path)) as weights:
        found = inspect_state_dict(weights.meta)
    if found.layout is not None and Path(path).is_dir():  # a transformer ControlNet in diffusers names
        found = dataclasses.replace(found, layout=DIFFUSERS_FOLDER_LAYOUT)
    return found


def weights_dtypes(path: str | os.PathLike) -> list[str]:
    """The dtypes `inspect_path(path).dtypes` reports (header only, as `inspect_path`)."""
    return inspect_path(path).dtypes
