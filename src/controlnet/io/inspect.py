"""Inspect a weights file or diffusers folder without building a model."""

from __future__ import annotations

import os
from pathlib import Path

from controlnet.io.formats import DIFFUSERS_WEIGHT_NAMES, Inspection, detect_format, inspect_state_dict
from controlnet.io.safe_load import read_state_dict

# safetensors header dtype names -> torch's
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

DIFFUSERS_SUBFOLDERS = ("", "controlnet", "unet")


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
    return inspect_state_dict(read_state_dict(weights_file(path)))


def weights_dtypes(path: str | os.PathLike) -> list[str]:
    """The dtypes `inspect_path(path).dtypes` reports; a plain .safetensors file's header alone is read."""
    file = weights_file(path)
    if file.suffix.lower() != ".safetensors":
        return inspect_path(path).dtypes
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
            if keys and detect_format(dict.fromkeys(keys)) == "original-combined":
                keys = [k for k in keys if k.startswith("control_model.")]  # as inspect_state_dict counts
            names = {handle.get_slice(k).get_dtype() for k in keys}
    except (SafetensorError, OSError, ValueError):
        return inspect_path(path).dtypes  # read_state_dict reports what is wrong with the file
    return sorted(_SAFETENSORS_DTYPES.get(n, n.lower()) for n in names)
