"""Build a `ControlNetPipeline` from what users have on disk: the built-in model, a diffusers folder, ControlNets.

Nothing is downloaded (DESIGN decision 4): every `from_pretrained` call passes `local_files_only=True`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from controlnet.model.controlnet import ControlNet

BUILTIN = "builtin"
MODEL_INDEX = "model_index.json"
# Components a diffusers text-to-image folder may hold, in the pipeline constructor's terms.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")


def load_pipeline(
    cls,
    base: str | os.PathLike,
    controlnets: Sequence = (),
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    **single_file_options,
):
    """`cls(...)` from `base` ("builtin", a diffusers folder or one original SD checkpoint file) plus ControlNets.

    ControlNets are objects or paths. `single_file_options` go to `single_file.load_single_file` (tokenizer=,
    tokenizer_2=, family=, configs=, prediction_type=).
    """
    if str(base) == BUILTIN:
        pipe = _builtin(cls, device, dtype)
    else:
        path = Path(base)
        if not path.exists():
            raise FileNotFoundError(
                f"base model not found: {path} (expected 'builtin' or a diffusers model folder)"
            )
        if path.is_dir():
            pipe = _diffusers_folder(cls, path)
        else:
            from controlnet.io.single_file import load_single_file

            pipe = load_single_file(cls, path, **single_file_options)
        pipe.base_name = str(path)
    pipe.controlnets = [_controlnet(c, pipe.unet) for c in controlnets]
    for module in pipe._modules():
        module.eval().requires_grad_(False)
    return pipe.to(device, dtype)


def _builtin(cls, device, dtype):
    try:
        from controlnet.builtin.base import load_builtin_base
    except ImportError as err:
        raise ValueError(f"the built-in base model is not available in this version ({err})") from None
    base = load_builtin_base(device=device, dtype=dtype or torch.float32)
    pipe = cls(base.unet, base.vae, base.text_encoder, base.tokenizer, base.scheduler)
    pipe.base_name = BUILTIN
    return pipe


def _diffusers_folder(cls, path: Path):
    index_file = path / MODEL_INDEX
    if not index_file.is_file():
        raise FileNotFoundError(f"{path}: not a diffusers model folder (no {MODEL_INDEX})")
    index = json.loads(index_file.read_text())
    parts = {}
    for name in COMPONENTS:
        entry = index.get(name)
        if not entry or entry[0] is None or entry[1] is None:
            parts[name] = None
            continue
        library, class_name = entry
        module = __import__(library)
        loader = getattr(module, class_name)
        kwargs = {"local_files_only": True}
        parts[name] = loader.from_pretrained(str(path / name), **kwargs)
    missing = [n for n in ("unet", "text_encoder", "tokenizer", "scheduler") if parts[n] is None]
    if missing:
        raise ValueError(f"{path}: the diffusers folder lacks {', '.join(missing)}")
    force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
    return cls(**parts, force_zeros_for_empty_prompt=force_zeros)


def _controlnet(entry, unet) -> ControlNet:
    if isinstance(entry, ControlNet):
        return entry
    from controlnet.io.api import load_controlnet

    return load_controlnet(entry, unet=unet)
