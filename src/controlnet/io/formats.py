"""What a weights file holds: which format, which model, which base family; read from key names and shapes.

Formats users have on disk:
- `original-controlnet`: `control_*.pth/.safetensors` with `input_hint_block.*`, `zero_convs.*` keys, with or
  without the `control_model.` prefix;
- `original-combined`: v1.0 files with `control_model.*` plus the whole SD model (`model.diffusion_model.*`,
  `first_stage_model.*`, `cond_stage_model.*`);
- `original-sd`: an LDM/SD checkpoint (`model.diffusion_model.*`), e.g. a base or community model;
- `diffusers-controlnet`: `controlnet_cond_embedding.*`, `controlnet_down_blocks.*` keys;
- `diffusers-unet`: `down_blocks.*` + `up_blocks.*` keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import torch

from controlnet.errors import CheckpointError

ORIGINAL_UNET_PREFIX = "model.diffusion_model."
DIFFUSERS_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CONFIG_NAME = "config.json"

# Cross-attention context width -> base family (SD1.x: CLIP ViT-L/14, SD2.x: OpenCLIP ViT-H/14, SDXL: both).
FAMILY_BY_CONTEXT_DIM = {768: "sd15", 1024: "sd21", 2048: "sdxl"}
# Each format as a sentence names it (with its article: "holds an original-SD checkpoint").
FORMAT_PHRASES = {
    "original-controlnet": "an original-format ControlNet",
    "original-combined": "an original v1.0 combined checkpoint (ControlNet + SD)",
    "original-sd": "an original-SD checkpoint (model.diffusion_model.* keys)",
    "diffusers-controlnet": "a diffusers ControlNet",
    "diffusers-unet": "a diffusers UNet",
}
FAMILY_NAMES = {"sd15": "Stable Diffusion 1.x", "sd21": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}


@dataclass(frozen=True)
class Family:
    """What a ControlNet and its base must share, as read from names and shapes (a header) or a UNet config: the
    width of the text context the model cross-attends to, and SDXL's added text_time embedding."""

    context_dim: int | None
    text_time: bool = False

    @property
    def name(self) -> str | None:
        """sd15 | sd21 | sdxl, or None for a custom (e.g. tiny) architecture."""
        return FAMILY_BY_CONTEXT_DIM.get(self.context_dim)

    def describe(self) -> str:
        if self.name is not None:
            return FAMILY_NAMES[self.name]
        style = "SDXL-style" if self.text_time else "SD1.x/2.x-style"
        return f"a custom {style} model (cross-attention width {self.context_dim})"

    def matches(self, other: Family) -> bool:
        """False only when both are known and differ (an unknown width cannot be refused from a header)."""
        if self.context_dim is None or other.context_dim is None:
            return True
        return (self.context_dim, self.text_time) == (other.context_dim, other.text_time)


# SDXL's added embedding (time ids + pooled text): `label_emb.*` in original files, `add_embedding.*` in diffusers'.
TEXT_TIME_KEYS = ("label_emb.", "add_embedding.")


def family_of_state(state: dict) -> Family:
    """The family of a ControlNet's or UNet's tensors (meta tensors will do: names and shapes only)."""
    return Family(context_dim(state), any(part in k for k in state for part in TEXT_TIME_KEYS))


def family_of_unet_config(config: dict) -> Family:
    """The family of a diffusers `UNet2DConditionModel` config."""
    dim = config.get("cross_attention_dim")
    if isinstance(dim, (list, tuple)):
        dim = dim[0] if len(set(dim)) == 1 else None
    return Family(dim, config.get("addition_embed_type") == "text_time")


def check_family(control: Family, base: Family, control_what: str, base_what: str) -> None:
    """Refuse a ControlNet made for another base family, in one line naming both (from headers: milliseconds,
    before any weights are read; the alternative is a key-by-key mismatch after the whole load)."""
    if not control.matches(base):
        raise CheckpointError(
            f"{control_what} is a ControlNet for {control.describe()}, but {base_what} is {base.describe()}: a "
            "ControlNet works only with a base of the family it was trained on"
        )


@dataclass
class Inspection:
    format: str
    family: str | None  # "sd15" | "sd21" | "sdxl" | None (unknown, e.g. a tiny or custom model)
    num_parameters: int
    dtypes: list[str]
    num_control_outputs: int | None  # ControlNets only
    context_dim: int | None
    text_time: bool = False  # SDXL's added embedding (label_emb / add_embedding)

    @property
    def base_family(self) -> Family:
        """What the file's model shares with its base (`check_family`)."""
        return Family(self.context_dim, self.text_time)

    def describe(self) -> dict:
        return {
            "format": self.format,
            "base family": FAMILY_NAMES.get(self.family, "unknown (pass a UNet config)"),
            "parameters": f"{self.num_parameters:,}",
            "dtype": ", ".join(self.dtypes),
            "control outputs": self.num_control_outputs if self.num_control_outputs is not None else "-",
        }


def detect_format(state: dict) -> str:
    keys = list(state)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    contains = lambda part: any(part in k for k in keys)  # noqa: E731
    if has("control_model.") and has(ORIGINAL_UNET_PREFIX):
        return "original-combined"
    if contains("input_hint_block.") or contains("zero_convs."):
        return "original-controlnet"
    if has(ORIGINAL_UNET_PREFIX):
        return "original-sd"
    if has("controlnet_cond_embedding.") or has("controlnet_down_blocks."):
        return "diffusers-controlnet"
    if has("down_blocks.") and has("up_blocks."):
        return "diffusers-unet"
    raise CheckpointError(
        "the file holds no known model: expected ControlNet weights (original `control_model.*`/`input_hint_block.*`"
        " or diffusers `controlnet_*` keys) or a UNet (`model.diffusion_model.*` or diffusers `down_blocks.*`)"
    )


def context_dim(state: dict) -> int | None:
    """Width of the text context the model cross-attends to (from any attn2.to_k weight)."""
    for key, value in state.items():
        if key.endswith("attn2.to_k.weight"):
            return int(value.shape[1])
    return None


def count_control_outputs(keys, fmt: str) -> int | None:
    """A ControlNet's number of outputs (zero convs: one per UNet skip + the middle block; 13 for SD1.5, 10 for
    SDXL) from the key names of format `fmt` (detect_format's); None when `fmt` is not a ControlNet."""
    if fmt in ("original-controlnet", "original-combined"):
        return sum(1 for k in keys if k.endswith(".weight") and ("zero_convs." in k or "middle_block_out." in k))
    if fmt == "diffusers-controlnet":
        return sum(1 for k in keys if k.endswith(".weight") and k.startswith("controlnet_down_blocks.")) + 1
    return None


def inspect_state_dict(state: dict) -> Inspection:
    fmt = detect_format(state)
    if fmt == "original-combined":
        counted = {k: v for k, v in state.items() if k.startswith("control_model.")}
    else:
        counted = state
    family = family_of_state(counted)
    return Inspection(
        format=fmt,
        family=family.name,
        num_parameters=sum(v.numel() for v in counted.values()),
        dtypes=sorted({str(v.dtype).removeprefix("torch.") for v in counted.values()}),
        num_control_outputs=count_control_outputs(counted, fmt),
        context_dim=family.context_dim,
        text_time=family.text_time,
    )


def builtin_unet_config(family: str) -> dict:
    """The diffusers `UNet2DConditionModel` config of a base family, shipped so that single files load offline."""
    if family not in FAMILY_NAMES:
        raise ValueError(f"unknown base family {family!r}; expected one of {sorted(FAMILY_NAMES)}")
    text = resources.files("controlnet.io").joinpath(f"configs/{family}_unet.json").read_text()
    return json.loads(text)


def unet_config_for(state: dict, config: dict | None, what: str) -> dict:
    """The UNet config to build for `state`: the user's, else the shipped one of the detected family."""
    if config is not None:
        return dict(config)
    family = FAMILY_BY_CONTEXT_DIM.get(context_dim(state))
    if family is None:
        raise CheckpointError(
            f"cannot tell the architecture of {what} from its weights (cross-attention width "
            f"{context_dim(state)} matches no SD family); pass a diffusers UNet config (config= or --config)"
        )
    return builtin_unet_config(family)


def cast_state(state: dict, dtype: torch.dtype | None) -> dict:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
