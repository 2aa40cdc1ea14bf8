"""`load_unet`, `load_controlnet`, `save_controlnet`: one state-dict layout, two file formats
(docs/architecture.md#one-state-dict-layout-two-file-formats).

Our ControlNet's parameter names are diffusers' `ControlNetModel` names, so diffusers files load as they are.
Original `cldm` files are renamed by the bijective rules of `original_keys.py`; locked UNets in original
(LDM) single files go through diffusers' `convert_ldm_unet_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from controlnet.errors import CheckpointError
from controlnet.io import original_keys
from controlnet.io.ema import select_unet_weights
from controlnet.io.formats import (
    CONFIG_NAME,
    DIFFUSERS_WEIGHT_NAMES,
    FORMAT_PHRASES,
    ORIGINAL_UNET_PREFIX,
    TRANSFORMER_FORMATS,
    cast_state,
    check_family,
    detect_format,
    family_of_state,
    family_of_unet_config,
    unet_config_for,
    union_types,
)
from controlnet.io.lite import is_lite_folder, load_lite
from controlnet.io.safe_load import (
    WEIGHT_SUFFIXES,
    LazyWeights,
    atomic_path,
    check_strict,
    load_into_empty,
    map_state_dict,
    write_state_dict,
)
from controlnet.io.transformer_layouts import load_transformer_controlnet, transformer_controlnet_format
from controlnet.model.controlnet import ControlNet, encoder_skips
from controlnet.model.hint_encoder import SD_LATENT_DOWNSCALE

logger = logging.getLogger(__name__)

# Extra key in our diffusers-format config.json: stride of the hint encoder (diffusers always assumes 8).
HINT_DOWNSCALE_KEY = "hint_downscale_factor"


def _read_config(config: dict | str | os.PathLike | None) -> dict | None:
    if config is None or isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"UNet config not found: {path} (expected a diffusers config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"UNet config {path} is not valid JSON: {err}") from None


def build_unet(config: dict, device: str | torch.device = "cpu") -> UNet2DConditionModel:
    """A randomly initialised `UNet2DConditionModel` from a config dict (unknown `_*` keys ignored)."""
    try:
        with torch.device(device):
            return UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"invalid UNet config: {err}") from None


def _diffusers_folder(path: Path, subfolder: str) -> Path | None:
    for folder in (path, path / subfolder):
        if (folder / CONFIG_NAME).is_file() and any((folder / n).is_file() for n in DIFFUSERS_WEIGHT_NAMES):
            return folder
    return None


def locate_unet(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(path, its diffusers folder: the model dir or its `unet/`), or (path, None) for a single file; the errors
    every UNet loader gives for a missing path or a folder without diffusers weights."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"UNet not found: {path}")
    if not path.is_dir():
        return path, None
    folder = _diffusers_folder(path, "unet")
    if folder is None:
        raise CheckpointError(
            f"{path}: not a diffusers model folder (expected config.json + diffusion_pytorch_model.safetensors "
            "in it or in its unet/ subfolder)"
        )
    return path, folder


def unet_file_layout(
    path: Path, state: dict, config: dict | None, ema: bool | None = None, flags: dict | None = None
) -> tuple[dict, dict]:
    """A single UNet file's tensors under diffusers' names, and its config: original (LDM) keys are renamed by
    diffusers' converter, diffusers keys kept; any other content is refused. `config` as `load_unet` takes it;
    `ema` (and `flags`, the option's names in messages): which UNet of a file holding EMA weights too
    (`io.ema.select_unet_weights`: None = the EMA one)."""
    fmt = detect_format(state)
    if fmt in ("original-sd", "original-combined"):
        state, _ = select_unet_weights(state, ema, path.name, flags)
        unet_part = {k: v for k, v in state.items() if k.startswith(ORIGINAL_UNET_PREFIX)}
        config = unet_config_for(unet_part, config, path.name)
        try:
            state = convert_ldm_unet_checkpoint(state, config)
        except (KeyError, IndexError, ValueError) as err:
            raise CheckpointError(f"{path}: UNet weights do not fit the given config ({err!r})") from None
        return {k: v for k, v in state.items() if v is not None}, config
    if fmt == "diffusers-unet":
        return state, unet_config_for(state, config, path.name)
    raise CheckpointError(
        f"{path}: holds {FORMAT_PHRASES[fmt]}, not a UNet (`model.diffusion_model.*` or `down_blocks.*` keys)"
    )


def load_unet(
    path: str | os.PathLike,
    config: dict | str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    ema: bool | None = None,
) -> UNet2DConditionModel:
    """Load a locked base UNet from a diffusers folder (model dir or its `unet/`) or one original checkpoint file.

    `config` (dict or json path, a diffusers `UNet2DConditionModel` config) is needed when a single file's family
    cannot be recognised (SD1.x, SD2.x and SDXL are recognised from the cross-attention width). A file's tensors
    are memory-mapped and taken by the module as they are (float32, or `dtype`): no second copy in memory.
    `ema`: a file holding EMA weights too (`model_ema.*`, e.g. v1-5-pruned) gives its EMA UNet when True or None,
    the raw one when False; a log line names the weights used.
    """
    path, folder = locate_unet(path)
    config = _read_config(config)
    if folder is not None:
        unet = UNet2DConditionModel.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
        return unet.eval().requires_grad_(False)
    # memory-mapped: the UNet takes the file's tensors, no copy when dtypes agree
    state, config = unet_file_layout(path, map_state_dict(path), config, ema)
    # built on the meta device and given the tensors themselves (float32 unless `dtype`: only a cast copies)
    unet = build_unet(config, device="meta")
    return load_into_empty(unet, state, f"UNet in {path.name}", dtype or torch.float32)


def controlnet_state_from_original(state: dict, layers_per_block: int) -> dict:
    """Original `cldm` ControlNet weights (any prefix variant) -> our (diffusers) names. Exact, no copies."""
    control = original_keys.strip_control_prefix(state)
    num_hint_blocks = sum(1 for k in control if k.startswith("input_hint_block.") and k.endswith(".weight")) - 2
    try:
        return {original_keys.from_original(k, layers_per_block, num_hint_blocks): v for k, v in control.items()}
    except KeyError as err:
        raise CheckpointError(f"not an original-format ControlNet: {err.args[0]}") from None


def controlnet_state_to_original(state: dict, layers_per_block: int, prefix: str = "control_model.") -> dict:
    """Our (diffusers) ControlNet names -> original `cldm` names, in the original module order."""
    num_hint_blocks = sum(
        1 for k in state if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight")
    )
    renamed = {
        prefix + original_keys.to_original(k, layers_per_block, num_hint_blocks): v for k, v in state.items()
    }
    return dict(sorted(renamed.items(), key=lambda kv: _original_order(kv[0][len(prefix) :])))


# cldm.ControlNet registers its modules in this order; diffusers registers attentions before resnets and orders
# transformer-block internals differently, so written files are sorted back into the original order.
_ORIGINAL_GROUPS = (
    "time_embed",
    "label_emb",
    "input_blocks",
    "zero_convs",
    "input_hint_block",
    "middle_block",
    "middle_block_out",
)
_TRANSFORMER_BLOCK_ORDER = ("attn1", "ff", "attn2", "norm1", "norm2", "norm3")


def _original_order(key: str) -> tuple:
    parts = key.split(".")
    group = _ORIGINAL_GROUPS.index(parts[0]) if parts[0] in _ORIGINAL_GROUPS else len(_ORIGINAL_GROUPS)
    numbers = tuple(int(p) for p in parts[1:3] if p.isdigit())
    inner: tuple = ()
    if "transformer_blocks" in parts:
        i = parts.index("transformer_blocks")
        sub = parts[i + 2]
        inner = (int(parts[i + 1]), _TRANSFORMER_BLOCK_ORDER.index(sub) if sub in _TRANSFORMER_BLOCK_ORDER else 9)
    elif "proj_out" in parts:
        inner = (99,)  # SpatialTransformer: norm, proj_in, transformer_blocks, proj_out
    return (group, numbers, inner)


def _hint_args_from_state(state: dict, downscale_factor: int) -> dict:
    conv_in = state["controlnet_cond_embedding.conv_in.weight"]  # (16, C_cond, 3, 3)
    blocks = sorted(
        (int(k.split(".")[2]), v)
        for k, v in state.items()
        if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight")
    )
    channels = [int(conv_in.shape[0])] + [int(v.shape[0]) for i, v in blocks if i % 2 == 1]
    return {
        "cond_channels": int(conv_in.shape[1]),
        "hint_block_channels": tuple(channels),
        "hint_downscale_factor": downscale_factor,
    }


def load_controlnet(
    path: str | os.PathLike,
    unet: UNet2DConditionModel | None = None,
    config: dict | str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    hint_downscale_factor: int | None = None,
) -> ControlNet:
    """Load a ControlNet in original (`.pth/.safetensors`, any prefix, combined v1.0) or diffusers format.

    A transformer ControlNet (SD3/SD3.5, Flux: any published layout) loads as diffusers' `SD3ControlNetModel` /
    `FluxControlNetModel` through `transformer_layouts.load_transformer_controlnet` (`unet` is then its base, or None;
    `config` the ControlNet's config); given a UNet it is refused in one line naming both families.

    The network has `unet`'s architecture and dtype (its weights are not copied: the network is built on the meta
    device and the file's tensors are assigned to it); without `unet`, from `config` or the shipped config of the
    family recognised in the file (float32). The hint encoder's stride is not in the weights: it comes from
    `hint_downscale_factor`, else our config.json / safetensors metadata, else 8 (every released SD ControlNet).
    Only the ControlNet's tensors are read (not the SD model of a v1.0 combined file); a .safetensors file is
    memory-mapped (the tensors stay file-backed), others are read one tensor at a time.
    """
    if is_lite_folder(path):  # the ablation's ControlNet-lite (model/lite.py): its own folder format, io/lite.py
        return _load_lite(path, unet, dtype)
    transformer_base = unet is not None and not isinstance(unet, UNet2DConditionModel)  # an SD3 / Flux transformer
    if transformer_base or (unet is None and transformer_controlnet_format(path) is not None):
        return load_transformer_controlnet(path, base=unet, config=config, dtype=dtype)
    with open_controlnet(path, unet, config, hint_downscale_factor) as source:
        param = next(unet.parameters()) if unet is not None else None
        device = param.device if param is not None and param.device.type != "meta" else torch.device("cpu")
        net_dtype = param.dtype if param is not None else torch.get_default_dtype()
        # a .safetensors file is memory-mapped (as load_unet does): the net's tensors stay the file's page cache, no
        # copy in RAM; other files are read one tensor at a time
        mapped = map_state_dict(source.weights.path) if source.weights.kind == "safetensors" else None
        state = {
            k: (mapped[source.weights.key_of(v)] if mapped is not None else source.weights.read(v)).to(
                device=device, dtype=net_dtype
            )
            for k, v in source.state.items()
        }
    net = source.template
    net.load_state_dict(state, strict=True, assign=True)  # names and shapes checked by open_controlnet
    if dtype is not None:
        net = net.to(dtype)
    return net


def _load_lite(path, unet, dtype):
    """A ControlNet-lite folder, checked against `unet`'s skip connections when one is given."""
    net = load_lite(path)
    if unet is not None:
        channels, strides = encoder_skips(unet)
        own = [z.in_channels for z in net.controlnet_down_blocks]
        if (own, net.skip_strides) != (channels, strides):
            raise ValueError(
                f"{path}: a ControlNet-lite for skip channels {own} (strides {net.skip_strides}); "
                f"this UNet has {channels} (strides {strides})"
            )
        param = next(unet.parameters())
        net = net.to(dtype=param.dtype) if param.device.type == "meta" else net.to(param.device, param.dtype)
    return net.to(dtype) if dtype is not None else net


@dataclass
class ControlNetSource:
    """A ControlNet file opened lazily: its tensors under our names (meta tensors) and the network they fill.

    weights: the open file (`weights.read(state[name])` reads one tensor); state: our parameter name -> the file's
    tensor as a meta tensor, checked against `template`'s names and shapes; template: the network, on the meta
    device, with the hint encoder the file holds.
    """

    weights: LazyWeights
    state: dict[str, torch.Tensor]
    template: ControlNet

    def __enter__(self) -> ControlNetSource:
        return self

    def __exit__(self, *exc) -> None:
        self.weights.close()


def open_controlnet(
    path: str | os.PathLike,
    unet: UNet2DConditionModel | None = None,
    config: dict | str | os.PathLike | None = None,
    hint_downscale_factor: int | None = None,
) -> ControlNetSource:
    """Open a ControlNet file or folder without reading its tensors (see `load_controlnet` for the arguments).

    Every check `load_controlnet` makes (format, family, names and shapes) is made here, from the header alone.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ControlNet not found: {path}")
    config = _read_config(config)  # a bad config.json is refused before the weights are read
    downscale = SD_LATENT_DOWNSCALE
    folder_config = None
    if path.is_dir():
        folder = _diffusers_folder(path, "controlnet")
        if folder is None:
            raise CheckpointError(
                f"{path}: not a diffusers ControlNet folder (expected config.json + "
                "diffusion_pytorch_model.safetensors)"
            )
        folder_config = json.loads((folder / CONFIG_NAME).read_text())
        downscale = int(folder_config.get(HINT_DOWNSCALE_KEY, SD_LATENT_DOWNSCALE))
        weights = LazyWeights(next(folder / n for n in DIFFUSERS_WEIGHT_NAMES if (folder / n).is_file()))
    else:
        weights = LazyWeights(path)
        downscale = int(weights.metadata.get(HINT_DOWNSCALE_KEY, SD_LATENT_DOWNSCALE))
    try:
        if hint_downscale_factor is not None:
            downscale = hint_downscale_factor
        state = weights.meta
        fmt = detect_format(state)
        unet_config = dict(unet.config) if unet is not None else config
        if fmt in TRANSFORMER_FORMATS:  # a transformer base's ControlNet: refused by family, from the header
            control = family_of_state(state)
            if unet_config is not None:
                base_what = "the UNet given" if unet is not None else "the UNet config given"
                check_family(control, family_of_unet_config(unet_config), path.name, base_what)
            raise CheckpointError(
                f"{path.name} is a ControlNet for {control.describe()} ({FORMAT_PHRASES[fmt]}), but a UNet ControlNet "
                "(SD1.x/2.x/XL) is expected here"
            )
        if fmt not in ("original-controlnet", "original-combined", "diffusers-controlnet"):
            raise CheckpointError(f"{path}: holds {FORMAT_PHRASES[fmt]}, not a ControlNet")

        control = original_keys.strip_control_prefix(state) if fmt != "diffusers-controlnet" else state
        if unet_config is not None:  # a ControlNet of another family: one line now, not a key-by-key mismatch
            base_what = "the UNet given" if unet is not None else "the UNet config given"
            check_family(family_of_state(control), family_of_unet_config(unet_config), path.name, base_what)
        if unet_config is None and folder_config is not None:
            unet_config = unet_config_from_controlnet_config(folder_config)
        if fmt != "diffusers-controlnet":
            unet_config = unet_config_for(control, unet_config, path.name)
            state = controlnet_state_from_original(state, unet_config["layers_per_block"])
        else:
            unet_config = unet_config_for(state, unet_config, path.name)

        try:
            template = _template(state, unet_config, _hint_args_from_state(state, downscale), folder_config, path)
        except KeyError as err:
            raise CheckpointError(f"{path}: ControlNet weights lack {err.args[0]}") from None
        check_strict(template.state_dict(), state, f"ControlNet in {path.name}")
    except BaseException:
        weights.close()
        raise
    return ControlNetSource(weights, state, template)


# xinsir publishes no head count in the weights (attn.in_proj_weight is (3C, C) for any): every Union/ProMax file
# has 8 heads (its config.json and diffusers' ControlNetUnionModel default)
UNION_DEFAULT_HEADS = 8
UNION_CONFIG_KEYS = (
    "num_control_type",
    "num_trans_channel",
    "num_trans_head",
    "num_trans_layer",
    "num_proj_channel",
)


def _template(
    state: dict, unet_config: dict, hint_args: dict, folder_config: dict | None, path: Path
) -> ControlNet:
    """The network `state` fills, on the meta device: a ControlNet, or a union ControlNet sized from the file."""
    unet = build_unet(unet_config, device="meta")
    count = union_types(state)
    if count is None:
        return ControlNet.from_unet(unet, **hint_args)
    from controlnet.model.union_controlnet import UnionControlNet

    layers = {k.split(".")[1] for k in state if k.startswith("transformer_layes.")}
    type_width = state["control_add_embedding.linear_1.weight"].shape[1]  # (time_embed, T * d)
    heads = (folder_config or {}).get("num_trans_head", UNION_DEFAULT_HEADS)
    return UnionControlNet.from_unet(
        unet,
        count,
        **hint_args,
        num_trans_head=heads,
        num_trans_layer=len(layers),
        type_embed_dim=type_width // count,
    )


def unet_config_from_controlnet_config(config: dict) -> dict:
    """The locked UNet's config implied by a diffusers ControlNet config (decoder mirrors the encoder)."""
    mirror = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
    unet_config = {k: v for k, v in config.items() if not k.startswith("_")}
    for key in (
        "conditioning_channels",
        "conditioning_embedding_out_channels",
        "controlnet_conditioning_channel_order",
        "global_pool_conditions",
        HINT_DOWNSCALE_KEY,
        *UNION_CONFIG_KEYS,
    ):
        unet_config.pop(key, None)
    try:
        unet_config["up_block_types"] = [mirror[t] for t in reversed(config["down_block_types"])]
    except KeyError as err:
        raise CheckpointError(f"ControlNet config has an unsupported down block type {err.args[0]!r}") from None
    unet_config["out_channels"] = config.get("in_channels", 4)
    return unet_config


def save_controlnet(
    cnet: ControlNet,
    path: str | os.PathLike,
    format: str = "diffusers",
    dtype: torch.dtype | None = None,
    prefix: str = original_keys.ORIGINAL_CONTROL_PREFIX,
) -> Path:
    """Write `cnet` as a diffusers folder (config.json + safetensors) or one original-format file.

    format="original": `path` is a `.safetensors` (or `.pth`) file with `prefix` + cldm keys (`control_model.` as
    in the official files; "" for the unprefixed variant). Writes are atomic: nothing half-written on failure.
    """
    path = Path(path)
    layout = controlnet_file_layout(cnet, path, format, prefix)
    state = cast_state({k: v.detach() for k, v in cnet.state_dict().items()}, dtype)
    file_state = {file_key: state[name] for name, file_key in layout.names.items()}
    layout.write(path, lambda target: write_state_dict(file_state, target, metadata=layout.metadata))
    logger.info("saved ControlNet (%s) to %s", format, path)
    return path


@dataclass
class ControlNetFileLayout:
    """What `save_controlnet` writes for a network: the file's keys, metadata and (diffusers) config.json."""

    format: str
    names: dict[str, str]  # our parameter name -> the file's key, in the file's order
    metadata: dict[str, str]
    config: dict | None  # config.json of a diffusers folder; None for an original-format file

    def write(self, path: Path, write_weights: Callable[[Path], None]) -> None:
        """Write the file or folder at `path` atomically; `write_weights(file)` writes the weights file."""
        if self.config is None:
            write_weights(path)  # write_state_dict and write_safetensors_streamed are atomic themselves
            return
        with atomic_path(path) as tmp:
            tmp.mkdir()
            write_weights(tmp / DIFFUSERS_WEIGHT_NAMES[0])
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")


def controlnet_file_layout(
    cnet: ControlNet, path: Path, format: str, prefix: str = original_keys.ORIGINAL_CONTROL_PREFIX
) -> ControlNetFileLayout:
    """The layout `save_controlnet` writes for `cnet` (which may live on the meta device: names and shapes only).

    Refuses a bad `format` / file name for it before anything is written.
    """
    ours = list(cnet.state_dict())
    union = getattr(cnet, "union_config", None) is not None
    if format == "original" and union:
        raise ValueError(
            "a union ControlNet has no original (cldm) format: its publishers write diffusers names; use "
            "format='diffusers' (--to diffusers)"
        )
    if format == "original":
        names = controlnet_state_to_original(
            dict(zip(ours, ours, strict=True)), cnet.unet_config["layers_per_block"], prefix
        )
        metadata = {"format": "original-controlnet"}
        if cnet.hint_config.downscale_factor != SD_LATENT_DOWNSCALE:
            if path.suffix.lower() != ".safetensors":
                raise ValueError(
                    f"this ControlNet's hint encoder downsamples {cnet.hint_config.downscale_factor}x (not 8x); only a "
                    f".safetensors file can record that in the original format, got {path.name}"
                )
            metadata[HINT_DOWNSCALE_KEY] = str(cnet.hint_config.downscale_factor)
        return ControlNetFileLayout(format, {name: key for key, name in names.items()}, metadata, None)
    if format == "diffusers":
        if path.suffix.lower() in WEIGHT_SUFFIXES:
            raise ValueError(f"format='diffusers' writes a folder; got a file name {path.name}")
        config = {"_class_name": "ControlNetUnionModel" if union else "ControlNetModel", **cnet.diffusers_config()}
        if cnet.hint_config.downscale_factor != SD_LATENT_DOWNSCALE:
            config[HINT_DOWNSCALE_KEY] = cnet.hint_config.downscale_factor
        return ControlNetFileLayout(format, {name: name for name in ours}, {"format": "pt"}, config)
    raise ValueError(f"format={format!r}; expected 'diffusers' or 'original'")
