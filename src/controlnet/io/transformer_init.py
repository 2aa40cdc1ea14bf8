"""`controlnet init` from a transformer base (SD3/SD3.5, Flux) saved as diffusers writes it.

The new network is `model.transformer_controlnet`'s trainable copy (`from_transformer`): the base's embeddings and
first N blocks, zero-initialised condition input and outputs (docs/architecture.md#transformer-bases-are-the-same-
idea). The base's weights are memory-mapped, not read: the copy touches only the pages of the blocks it copies, so
a Flux base (23.8 GB in bf16) needs about what the copied blocks weigh, twice (file pages and the new net), and no
float32 detour (the net is built in the files' dtype).

Which folder is a transformer base is read from its config files only (model_index.json's `transformer` entry, or
a transformer folder's own config.json): io/ reads files, generate/ (which builds on io/) loads pipelines.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch

from controlnet.errors import CheckpointError
from controlnet.io.formats import CONFIG_NAME
from controlnet.io.safe_load import load_into_empty, map_state_dict
from controlnet.io.transformer_layouts import save_transformer_controlnet

# diffusers' class of a transformer base -> its family (the ControlNet classes are io.transformer_layouts.CLASS_NAMES)
BASE_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
MODEL_INDEX = "model_index.json"
# Options of the new network that only one family has (the CLI's names: diffusers' keyword arguments)
FAMILY_OPTIONS = {
    "sd3": ("num_layers", "extra_conditioning_channels"),
    "flux": ("num_layers", "num_single_layers", "pixel_hint", "num_mode"),
}


def transformer_base_folder(path: str | os.PathLike) -> tuple[str, Path] | None:
    """(family, the folder holding the transformer's config.json and weights) for an SD3/Flux base as diffusers
    writes it (a pipeline folder with model_index.json, or its `transformer` folder alone); None for anything else.
    Config files only."""
    path = Path(path)
    if not path.is_dir():
        return None
    index = _json(path / MODEL_INDEX)
    if index is not None:
        entry = index.get("transformer")
        if isinstance(entry, list) and len(entry) == 2 and entry[1] in BASE_CLASSES:
            return BASE_CLASSES[entry[1]], path / "transformer"
        return None
    config = _json(path / CONFIG_NAME)
    if config is not None and config.get("_class_name") in BASE_CLASSES:
        return BASE_CLASSES[config["_class_name"]], path
    return None


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _base_class(family: str):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    return {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[family]


def _controlnet_class(family: str):
    from controlnet.model.transformer_controlnet import FluxControlNet, SD3ControlNet

    return {"sd3": SD3ControlNet, "flux": FluxControlNet}[family]


def open_transformer_base(folder: Path, family: str, what: str) -> torch.nn.Module:
    """The base transformer of `folder` with its weights memory-mapped (no copy in RAM), in its files' dtype.

    Built on the meta device from its config.json, then given the mapped tensors (`load_into_empty`: the names and
    shapes checked, one line naming the first difference). A sharded folder's files are all mapped.
    """
    config = _json(folder / CONFIG_NAME)
    if config is None:
        raise CheckpointError(
            f"{what}: {folder / CONFIG_NAME} is missing or not JSON; expected the transformer's config"
        )
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{what}: no .safetensors weights in {folder} (diffusers' diffusion_pytorch_model*)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(map_state_dict(file))
    dtype = files_dtype(state)
    cls = _base_class(family)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        base = cls.from_config(config)
    return load_into_empty(base, state, f"{cls.__name__} in {folder}", dtype)


def files_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most of `state`'s bytes (a bf16 file with a few float32 norms is bf16)."""
    weights = Counter()
    for value in state.values():
        if value.is_floating_point():
            weights[value.dtype] += value.numel() * value.element_size()
    return weights.most_common(1)[0][0] if weights else torch.get_default_dtype()


def init_transformer_controlnet_file(
    base: str | os.PathLike,
    dst: str | os.PathLike,
    layout: str = "diffusers",
    dtype: torch.dtype | None = None,
    phase=lambda name: None,
    **options,
) -> torch.nn.Module:
    """Write a new ControlNet for the transformer base `base` (a diffusers folder) to `dst` in `layout`
    (io.transformer_layouts.LAYOUTS); `dtype` None keeps the base's. `options`: `from_transformer`'s (num_layers,
    ...; None values take its defaults), an option the base's family does not have is refused in one line.
    Returns the network (its random parts drawn from torch's global generator: seed it for a reproducible file)."""
    found = transformer_base_folder(base)
    if found is None:
        raise CheckpointError(
            f"{base}: not an SD3/SD3.5 or Flux base folder (model_index.json naming its transformer)"
        )
    family, folder = found
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    foreign = sorted(set(given) - set(FAMILY_OPTIONS[family]))
    if foreign:
        names = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise ValueError(
            f"{names}: not an option of a {family} ControlNet (its options: "
            f"{', '.join('--' + k.replace('_', '-') for k in FAMILY_OPTIONS[family])})"
        )
    phase(f"mapping the transformer of {Path(base).name}")
    transformer = open_transformer_base(folder, family, str(base))
    phase("copying its first blocks")
    net = _controlnet_class(family).from_transformer(transformer, **given)
    del transformer
    phase(f"writing {layout} {Path(dst).name}")
    save_transformer_controlnet(net, dst, layout, dtype)
    return net
