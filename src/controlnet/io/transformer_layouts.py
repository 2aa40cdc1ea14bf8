"""Transformer (SD3/SD3.5, Flux) ControlNets in every published layout: opened from the header, loaded, written and
converted exactly (docs/architecture.md#transformer-bases-are-the-same-idea).

The network is diffusers' `SD3ControlNetModel` / `FluxControlNetModel` (our model module has the same parameter
names). A file is opened lazily (`open_transformer_controlnet`: the layout from `formats.detect_format`, our names
from `transformer_keys`' tables, the config, and every check against the class's names and shapes, all from the
header); tensors are then read one at a time, so `convert` holds one tensor in memory and a fused `qkv` is split or
joined exactly (`torch.chunk` / `torch.cat`: the round trips are byte-identical).

Where a config comes from: the `config=` given, else a diffusers folder's config.json or the `config` metadata of a
file we wrote, else the shapes (`sd3_config` / `flux_config`). Two things are not in any weight: Flux's rotary axes
(known for its 128-wide heads: [16, 56, 56]) and SD3's head width where no q/k norm holds it (64 in every SD3/SD3.5
model); a file that cannot tell them is refused in one line asking for its config.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from controlnet.atomic import atomic_path
from controlnet.errors import CheckpointError
from controlnet.io.formats import (
    CONFIG_NAME,
    DIFFUSERS_WEIGHT_NAMES,
    FORMAT_PHRASES,
    TRANSFORMER_FAMILY_NAMES,
    TRANSFORMER_FORMATS,
    Family,
    check_family,
    detect_format,
    family_of_state,
    family_of_transformer_config,
    family_of_unet_config,
)
from controlnet.io.inspect import weights_file
from controlnet.io.safe_load import LazyWeights, check_strict, write_safetensors_streamed
from controlnet.io.transformer_keys import KEY_MAPS, STABILITY_CONTROL_TYPE_KEY

logger = logging.getLogger(__name__)

CLASS_NAMES = {"sd3": "SD3ControlNetModel", "flux": "FluxControlNetModel"}
# What `save_transformer_controlnet` / `convert` write: the name a user gives -> the format written (detect_format's).
LAYOUTS = {
    "diffusers": None,  # a diffusers folder: config.json + diffusion_pytorch_model.safetensors
    "diffusers-file": None,  # one .safetensors in diffusers names, as InstantX and Shakker publish
    "xlabs": "xlabs-flux-controlnet",
    "stability": "stability-sd35-controlnet",
}
LAYOUT_FAMILY = {"xlabs": "flux", "stability": "sd3"}
CONFIG_METADATA_KEY = "config"  # our single files record the diffusers config in the safetensors metadata
# config.json key that keeps Stability's `control_type` scalar (0 blur, 1 canny, 2 depth), so that a converted
# folder writes the same file back: {"value": ..., "dtype": ..., "shape": [...]}.
STABILITY_CONTROL_TYPE_CONFIG = "stability_control_type"
FLUX_HEAD_DIM = 128
FLUX_ROPE_AXES = [16, 56, 56]  # Flux's rotary axes (time, height, width) for its 128-wide heads; in no weight
SD3_HEAD_DIM = 64  # every SD3/SD3.5 model: hidden = 64 x depth, heads = depth
SD3_LATENT_CHANNELS = 16  # SD3's VAE


def model_class(family: str):
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    return {"sd3": SD3ControlNetModel, "flux": FluxControlNetModel}[family]


def _init_config(family: str, config: dict) -> dict:
    """The keys of `config` the class's constructor takes (no `_class_name`, no extras of ours)."""
    params = inspect.signature(model_class(family).__init__).parameters
    return {k: v for k, v in config.items() if k in params}


def build_template(family: str, config: dict):
    """The network of `config` on the meta device (names and shapes, no memory)."""
    try:
        with torch.device("meta"):
            return model_class(family).from_config(_init_config(family, config))
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as err:
        raise ValueError(f"invalid {CLASS_NAMES[family]} config: {err}") from None


@dataclass(frozen=True)
class Piece:
    """Where one of our tensors lies in a file: the file's key, and its part of a fused tensor (dim 0)."""

    key: str
    index: int = 0
    parts: int = 1


@dataclass
class TransformerControlNetSource:
    """A transformer ControlNet opened lazily: format, family, config, and our name -> its `Piece` of the file.

    `meta`: our name -> a meta tensor with its shape and dtype, checked against the class built from `config`.
    """

    weights: LazyWeights
    format: str
    family: str
    config: dict
    pieces: dict[str, Piece]
    meta: dict[str, torch.Tensor]
    _fused: dict[str, tuple[torch.Tensor, set[int]]] = field(default_factory=dict, repr=False)

    def read(self, name: str) -> torch.Tensor:
        """Our tensor `name`, read from the file; a fused tensor is read once and kept until all its parts are."""
        piece = self.pieces[name]
        if piece.parts == 1:
            return self.weights.read(piece.key)
        if piece.key not in self._fused:
            self._fused[piece.key] = (self.weights.read(piece.key), set(range(piece.parts)))
        tensor, left = self._fused[piece.key]
        left.discard(piece.index)
        if not left:
            del self._fused[piece.key]
        return tensor.chunk(piece.parts, dim=0)[piece.index].clone()

    def __enter__(self) -> TransformerControlNetSource:
        return self

    def __exit__(self, *exc) -> None:
        self._fused.clear()
        self.weights.close()


def _weights_and_folder_config(path: Path) -> tuple[LazyWeights, dict | None]:
    if path.is_dir():
        file = weights_file(path)
        config_file = file.parent / CONFIG_NAME
        if not config_file.is_file() or file.name not in DIFFUSERS_WEIGHT_NAMES:
            raise CheckpointError(
                f"{path}: not a diffusers ControlNet folder (expected config.json + diffusion_pytorch_model.safetensors)"
            )
        return LazyWeights(file), json.loads(config_file.read_text())
    weights = LazyWeights(path)
    text = weights.metadata.get(CONFIG_METADATA_KEY)
    return weights, json.loads(text) if text else None


def transformer_controlnet_format(path: str | os.PathLike) -> str | None:
    """The layout of a transformer ControlNet file or folder (`formats.TRANSFORMER_FORMATS`), else None; from the
    header of a `.safetensors` file only (every published transformer ControlNet is one), milliseconds."""
    path = Path(path)
    try:
        file = weights_file(path)
    except FileNotFoundError:
        return None
    if file.suffix.lower() != ".safetensors":
        return None
    with LazyWeights(file) as weights:
        try:
            fmt = detect_format(weights.meta)
        except CheckpointError:
            return None
    return fmt if fmt in TRANSFORMER_FORMATS else None


def family_of_model_config(config: dict) -> Family:
    """The family of a base's (or ControlNet's) diffusers config: a UNet's, SD3's or Flux's."""
    if "down_block_types" in config or "cross_attention_dim" in config:
        return family_of_unet_config(config)
    return family_of_transformer_config(config)


def open_transformer_controlnet(
    path: str | os.PathLike,
    config: dict | str | os.PathLike | None = None,
    base=None,
    base_what: str | None = None,
) -> TransformerControlNetSource:
    """Open a transformer ControlNet file or folder without reading its weights; every check is made here.

    config: the ControlNet's diffusers config (dict or config.json path) when the file cannot tell it. base: a base
    model or its config (dict): a ControlNet of another family is refused in one line naming both. A UNet ControlNet,
    or a file we cannot read (fp8 scaled, Flux Tools, Fun/VACE, GGUF), is refused in one line before any tensor is read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ControlNet not found: {path}")
    config = _read_json(config)
    weights, stored_config = _weights_and_folder_config(path)
    try:
        fmt = detect_format(weights.meta)
        base_config = dict(base.config) if hasattr(base, "config") else base
        if fmt not in TRANSFORMER_FORMATS:
            family = family_of_state(weights.meta)
            if base_config is not None:
                check_family(family, family_of_model_config(base_config), path.name, base_what or "the base given")
            kind = "UNet ControlNet" if "controlnet" in fmt else FORMAT_PHRASES[fmt]
            raise CheckpointError(
                f"{path.name} holds {FORMAT_PHRASES[fmt]} ({kind} for {family.describe()}), but a transformer ControlNet "
                f"is expected here ({' or '.join(TRANSFORMER_FAMILY_NAMES.values())})"
            )
        family = TRANSFORMER_FORMATS[fmt]
        if base_config is not None:
            check_family(
                family_of_state(weights.meta),
                family_of_model_config(base_config),
                path.name,
                base_what or "the base given",
            )
        pieces, extras = _pieces(weights.meta, fmt, path.name)
        meta = {name: _part(weights.meta[p.key], p) for name, p in pieces.items()}
        config = dict(config or stored_config or infer_config(meta, fmt, family, path.name))
        if family_of_transformer_config(config).arch != family:
            raise CheckpointError(
                f"{path.name} holds {FORMAT_PHRASES[fmt]}, but the config given is for {CLASS_NAMES[other(family)]}"
            )
        config["_class_name"] = CLASS_NAMES[family]
        check_strict(build_template(family, config).state_dict(), meta, f"ControlNet in {path.name}")
        if STABILITY_CONTROL_TYPE_KEY in extras:  # the one datum read at open: a scalar
            value = weights.read(STABILITY_CONTROL_TYPE_KEY)
            config[STABILITY_CONTROL_TYPE_CONFIG] = {
                "value": value.item(),
                "dtype": str(value.dtype).removeprefix("torch."),
                "shape": list(value.shape),
            }
    except BaseException:
        weights.close()
        raise
    return TransformerControlNetSource(weights, fmt, family, config, pieces, meta)


def other(family: str) -> str:
    return "flux" if family == "sd3" else "sd3"


def _read_json(config: dict | str | os.PathLike | None) -> dict | None:
    if config is None or isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"ControlNet config not found: {path} (expected a diffusers config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"config {path} is not valid JSON: {err}") from None


def _pieces(meta: dict, fmt: str, what: str) -> tuple[dict[str, Piece], dict[str, torch.Tensor]]:
    """Our name -> its piece of the file, and the file's non-parameter entries (Stability's control_type)."""
    if fmt not in KEY_MAPS:
        return {k: Piece(k) for k in meta}, {}
    key_map = KEY_MAPS[fmt]
    pieces, extras = {}, {}
    for key, value in meta.items():
        if fmt == "stability-sd35-controlnet" and key == STABILITY_CONTROL_TYPE_KEY:
            extras[key] = value
            continue
        try:
            names = key_map.to_ours(key)
        except KeyError:
            raise CheckpointError(f"{what}: unexpected key {key!r} for {FORMAT_PHRASES[fmt]}") from None
        if value.shape[0] % len(names):
            raise CheckpointError(
                f"{what}: {key} {tuple(value.shape)} does not split into {len(names)} equal parts"
            )
        for i, name in enumerate(names):
            pieces[name] = Piece(key, i, len(names))
    return pieces, extras


def _part(value: torch.Tensor, piece: Piece) -> torch.Tensor:
    shape = (value.shape[0] // piece.parts, *value.shape[1:])
    return torch.empty(shape, dtype=value.dtype, device="meta")


def _needs_config(what: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f"cannot tell the architecture of {what} from its weights ({reason}); pass the ControlNet's diffusers "
        "config.json (config= or --config)"
    )


def infer_config(meta: dict, fmt: str, family: str, what: str) -> dict:
    """The diffusers config of a ControlNet from our names and shapes alone."""
    return sd3_config(meta, fmt, what) if family == "sd3" else flux_config(meta, what)


def _count(meta: dict, prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in meta if k.startswith(prefix)})


def sd3_config(meta: dict, fmt: str, what: str) -> dict:
    """`SD3ControlNetModel`'s config from shapes: width and patch from `pos_embed_input`, depth from the blocks, the
    head width from the q norm (else SD3's 64), the text widths from their embedders, dual attention from `attn2`."""
    proj = meta["pos_embed_input.proj.weight"]  # (inner, latent (+ extra) channels, patch, patch)
    inner, cond_in, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    latent = meta.get("pos_embed.proj.weight")
    in_channels = int(latent.shape[1]) if latent is not None else min(cond_in, SD3_LATENT_CHANNELS)
    norm_q = meta.get("transformer_blocks.0.attn.norm_q.weight")
    head = int(norm_q.shape[0]) if norm_q is not None else SD3_HEAD_DIM
    if inner % head:
        raise _needs_config(what, f"width {inner} is not a whole number of {head}-wide heads")
    context = meta.get("context_embedder.weight")
    pos = meta.get("pos_embed.pos_embed")  # (1, max_size^2, inner)
    num_layers = _count(meta, "transformer_blocks.")
    qk_norm = None
    if norm_q is not None:
        qk_norm = "layer_norm" if "transformer_blocks.0.attn.norm_q.bias" in meta else "rms_norm"
    return {
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_layers": num_layers,
        "attention_head_dim": head,
        "num_attention_heads": inner // head,
        "joint_attention_dim": int(context.shape[1]) if context is not None else None,
        "caption_projection_dim": int(context.shape[0]) if context is not None else inner,
        "pooled_projection_dim": int(meta["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "pos_embed_max_size": math.isqrt(int(pos.shape[1])) if pos is not None else None,
        "extra_conditioning_channels": cond_in - in_channels,
        "dual_attention_layers": [
            i for i in range(num_layers) if f"transformer_blocks.{i}.attn2.to_q.weight" in meta
        ],
        "qk_norm": qk_norm,
        "use_pos_embed": latent is not None,
        "pos_embed_type": "sincos" if latent is not None else None,
        # Stability's nets take the pooled text as it is (diffusers' conversion script says so); InstantX's zeros
        "force_zeros_for_pooled_projection": fmt != "stability-sd35-controlnet",
    }


def flux_config(meta: dict, what: str) -> dict:
    """`FluxControlNetModel`'s config from shapes; XLabs' pixel-space hint gives `conditioning_embedding_channels`
    and the patch that packs its output into `controlnet_x_embedder`'s inputs (2: 16 channels x 2 x 2 = 64)."""
    image = meta["x_embedder.weight"]  # (inner, packed latent channels)
    inner, in_channels = int(image.shape[0]), int(image.shape[1])
    norm_q = meta.get(
        "transformer_blocks.0.attn.norm_q.weight", meta.get("single_transformer_blocks.0.attn.norm_q.weight")
    )
    if norm_q is None:
        raise _needs_config(what, "no block holds a q norm to give the head width")
    head = int(norm_q.shape[0])
    if head != FLUX_HEAD_DIM:
        raise _needs_config(
            what, f"rotary axes for {head}-wide heads are in no weight; Flux's are {FLUX_HEAD_DIM}"
        )
    hint = meta.get("input_hint_block.conv_out.weight")  # (conditioning channels, 16, 3, 3)
    conditioning = int(hint.shape[0]) if hint is not None else None
    mode = meta.get("controlnet_mode_embedder.weight")
    return {
        "patch_size": math.isqrt(in_channels // conditioning) if conditioning else 1,
        "in_channels": in_channels,
        "num_layers": _count(meta, "transformer_blocks."),
        "num_single_layers": _count(meta, "single_transformer_blocks."),
        "attention_head_dim": head,
        "num_attention_heads": inner // head,
        "joint_attention_dim": int(meta["context_embedder.weight"].shape[1]),
        "pooled_projection_dim": int(meta["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in meta,
        "axes_dims_rope": FLUX_ROPE_AXES,
        "num_mode": int(mode.shape[0]) if mode is not None else None,
        "conditioning_embedding_channels": conditioning,
    }


def load_transformer_controlnet(
    path: str | os.PathLike,
    base=None,
    config: dict | str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    base_what: str | None = None,
):
    """An `SD3ControlNetModel` / `FluxControlNetModel` from any published layout, in the file's dtype (or `dtype`).

    base: the base transformer (or its config) it will control: another family is refused before any tensor is read.
    """
    with open_transformer_controlnet(path, config, base, base_what) as source:
        state = {name: source.read(name) for name in source.pieces}
        template = build_template(source.family, source.config)
    template.load_state_dict(state, strict=True, assign=True)
    net = template.eval()
    if dtype is not None:
        net = net.to(dtype)
    extra = source.config.get(STABILITY_CONTROL_TYPE_CONFIG)
    if extra is not None:  # the condition the net was trained on; generation picks its hint convention from it
        net.register_to_config(**{STABILITY_CONTROL_TYPE_CONFIG: extra})
    return net


@dataclass
class TransformerFileLayout:
    """What is written: file key -> our names (several: concatenated along dim 0), metadata, config.json."""

    keys: dict[str, tuple[str, ...]]
    metadata: dict[str, str]
    config: dict | None  # a folder's config.json; None for one file
    extras: dict[str, torch.Tensor]  # file entries that are not parameters (Stability's control_type)


def transformer_file_layout(
    family: str, config: dict, names: list[str], path: Path, layout: str
) -> TransformerFileLayout:
    """The layout written for a network with parameters `names` (refuses a bad layout or file name first)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    config = {"_class_name": CLASS_NAMES[family], **{k: v for k, v in config.items() if k != "_class_name"}}
    if "_use_default_values" in config:  # diffusers lists these from a set, in an order that differs between
        # processes: sorted, two writes of the same net are the same bytes (config.json and the file's metadata)
        config["_use_default_values"] = sorted(config["_use_default_values"])
    if layout == "diffusers":
        if path.suffix:
            raise ValueError(f"the diffusers layout is a folder; got a file name {path.name}")
        return TransformerFileLayout({n: (n,) for n in names}, {"format": "pt"}, config, {})
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"the {layout} layout is one .safetensors file; got {path.name}")
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config)}
    if layout == "diffusers-file":
        return TransformerFileLayout({n: (n,) for n in names}, metadata, None, {})
    if LAYOUT_FAMILY[layout] != family:
        raise ValueError(
            f"the {layout} layout holds {TRANSFORMER_FAMILY_NAMES[LAYOUT_FAMILY[layout]]} ControlNets; this one is "
            f"for {TRANSFORMER_FAMILY_NAMES[family]}"
        )
    try:
        keys = KEY_MAPS[LAYOUTS[layout]].to_publisher(names)
    except KeyError as err:
        raise ValueError(f"the {layout} layout has no place for this ControlNet's {err.args[0]}") from None
    extras = {}
    control_type = config.get(STABILITY_CONTROL_TYPE_CONFIG)
    if layout == "stability" and control_type is not None:
        extras[STABILITY_CONTROL_TYPE_KEY] = torch.tensor(
            control_type["value"], dtype=getattr(torch, control_type["dtype"])
        ).reshape(control_type["shape"])
    return TransformerFileLayout(keys, metadata, None, extras)


def write_transformer_controlnet(
    family: str,
    config: dict,
    meta: dict[str, torch.Tensor],
    produce: Callable[[str], torch.Tensor],
    path: str | os.PathLike,
    layout: str = "diffusers",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a network (our name -> meta tensor, `produce(name)` -> its values) in `layout`, one tensor at a time,
    atomically. `dtype` casts floating tensors (None: as they are)."""
    path = Path(path)
    plan = transformer_file_layout(family, config, list(meta), path, layout)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    specs = {}
    for key, names in plan.keys.items():
        first = meta[names[0]]
        shape = (sum(meta[n].shape[0] for n in names), *first.shape[1:]) if first.dim() else first.shape
        specs[key] = torch.empty(shape, dtype=cast(first).dtype, device="meta")
    for key, value in plan.extras.items():
        specs[key] = torch.empty(value.shape, dtype=value.dtype, device="meta")

    def produce_key(key: str) -> torch.Tensor:
        if key in plan.extras:
            return plan.extras[key]
        names = plan.keys[key]
        parts = [cast(produce(n)) for n in names]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    if plan.config is None:
        write_safetensors_streamed(specs, produce_key, path, plan.metadata)
        return path
    with atomic_path(path) as tmp:
        tmp.mkdir()
        write_safetensors_streamed(specs, produce_key, tmp / DIFFUSERS_WEIGHT_NAMES[0], plan.metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(plan.config, indent=2) + "\n")
    return path


def save_transformer_controlnet(net, path: str | os.PathLike, layout: str = "diffusers", dtype=None) -> Path:
    """Write an `SD3ControlNetModel` / `FluxControlNetModel` (or our model of the same names) in `layout`."""
    family = "flux" if "num_single_layers" in net.config else "sd3"
    state = {k: v.detach() for k, v in net.state_dict().items()}
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
    return write_transformer_controlnet(family, dict(net.config), meta, state.__getitem__, path, layout, dtype)


def convert_transformer_controlnet_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    layout: str,
    config: dict | str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    phase: Callable[[str], None] = lambda name: None,
) -> TransformerControlNetSource:
    """`save_transformer_controlnet(load_transformer_controlnet(src), dst, layout)`, one tensor at a time: the
    tensors are the file's bytes, renamed (and a fused qkv split or joined); nothing is cast unless `dtype`."""
    phase(f"reading {Path(src).name}")
    with open_transformer_controlnet(src, config) as source:
        phase(f"writing {layout} {Path(dst).name}")
        write_transformer_controlnet(source.family, source.config, source.meta, source.read, dst, layout, dtype)
    return source
