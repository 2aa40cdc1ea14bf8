"""What a weights file holds: which format, which model, which base family; read from key names and shapes.

Formats users have on disk:
- `original-controlnet`: `control_*.pth/.safetensors` with `input_hint_block.*`, `zero_convs.*` keys, with or
  without the `control_model.` prefix;
- `original-combined`: v1.0 files with `control_model.*` plus the whole SD model (`model.diffusion_model.*`,
  `first_stage_model.*`, `cond_stage_model.*`);
- `original-sd`: an LDM/SD checkpoint (`model.diffusion_model.*`), e.g. a base or community model;
- `diffusers-controlnet`: `controlnet_cond_embedding.*`, `controlnet_down_blocks.*` keys (a union ControlNet,
  xinsir's Union/ProMax, is one with `task_embedding` and its fusion front end: `union_types`);
- `diffusers-unet`: `down_blocks.*` + `up_blocks.*` keys.

Transformer (SD3/SD3.5, Flux) ControlNets, one format per published layout (key maps: `transformer_keys.py`):
- `diffusers-sd3-controlnet` / `diffusers-flux-controlnet`: diffusers' `SD3ControlNetModel` / `FluxControlNetModel`
  names, as a diffusers folder or one file (InstantX, Shakker);
- `xlabs-flux-controlnet`: XLabs' x-flux files (`double_blocks.N`, pixel-space `input_hint_block.N`);
- `stability-sd35-controlnet`: Stability's SD3.5 ControlNets (`adaLN_modulation` inside the blocks).

What we cannot read is refused by name from the keys (`refuse_unreadable`): fp8 "scaled" files, Flux Tools
channel-concat models and Control LoRAs, Fun/VACE ControlNets (GGUF files by their magic, in `safe_load`).
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
# Transformer bases: the family is the network (a ControlNet copies its blocks), whatever its size.
TRANSFORMER_FAMILY_NAMES = {"sd3": "Stable Diffusion 3 / 3.5 (MMDiT)", "flux": "Flux"}
TRANSFORMER_FORMATS = {
    "diffusers-sd3-controlnet": "sd3",
    "stability-sd35-controlnet": "sd3",
    "diffusers-flux-controlnet": "flux",
    "xlabs-flux-controlnet": "flux",
}
FORMAT_PHRASES.update(
    {
        "diffusers-sd3-controlnet": "an SD3 ControlNet in diffusers names",
        "stability-sd35-controlnet": "an SD3.5 ControlNet in Stability's layout",
        "diffusers-flux-controlnet": "a Flux ControlNet in diffusers names",
        "xlabs-flux-controlnet": "a Flux ControlNet in XLabs' layout",
    }
)
# Entries of transformer ControlNet files that are not parameters: SD3's fixed sin-cos position table (a buffer
# diffusers saves) and Stability's `control_type` scalar.
TRANSFORMER_NON_PARAMETERS = ("pos_embed.pos_embed", "control_type")
# Who publishes each layout (inspect's "layout" line).
LAYOUT_PHRASES = {
    "diffusers-sd3-controlnet": "diffusers names (a diffusers folder, or one file as InstantX publishes)",
    "stability-sd35-controlnet": "Stability AI's SD3.5 ControlNets (sd3.5_large_controlnet_*)",
    "diffusers-flux-controlnet": "diffusers names (a diffusers folder, or one file as InstantX and Shakker publish)",
    "xlabs-flux-controlnet": "XLabs x-flux (pixel-space input_hint_block, double_blocks.N)",
}


@dataclass(frozen=True)
class Family:
    """What a ControlNet and its base must share, as read from names and shapes (a header) or a UNet config: the
    width of the text context the model cross-attends to, and SDXL's added text_time embedding."""

    context_dim: int | None
    text_time: bool = False
    arch: str = "unet"  # "unet" | "sd3" | "flux": the base network; a transformer's context_dim is its T5 width

    @property
    def name(self) -> str | None:
        """sd15 | sd21 | sdxl | sd3 | flux, or None for a custom (e.g. tiny) UNet architecture."""
        if self.arch != "unet":
            return self.arch
        return FAMILY_BY_CONTEXT_DIM.get(self.context_dim)

    def describe(self) -> str:
        if self.arch != "unet":
            return TRANSFORMER_FAMILY_NAMES[self.arch]
        if self.name is not None:
            return FAMILY_NAMES[self.name]
        style = "SDXL-style" if self.text_time else "SD1.x/2.x-style"
        return f"a custom {style} model (cross-attention width {self.context_dim})"

    def matches(self, other: Family) -> bool:
        """False when the base networks differ (a UNet, SD3, Flux), or both widths are known and differ (an unknown
        width cannot be refused from a header)."""
        if self.arch != other.arch:
            return False
        if self.context_dim is None or other.context_dim is None:
            return True
        return (self.context_dim, self.text_time) == (other.context_dim, other.text_time)


# SDXL's added embedding (time ids + pooled text): `label_emb.*` in original files, `add_embedding.*` in diffusers'.
TEXT_TIME_KEYS = ("label_emb.", "add_embedding.")


def family_of_state(state: dict) -> Family:
    """The family of a ControlNet's or UNet's tensors (meta tensors will do: names and shapes only)."""
    arch = transformer_arch(state)
    if arch is not None:
        return Family(transformer_context_dim(state), arch=arch)
    # a whole name component: a union net's `control_add_embedding` is its type embedding, not SDXL's
    return Family(context_dim(state), any("." + part in "." + k for k in state for part in TEXT_TIME_KEYS))


def transformer_arch(state: dict) -> str | None:
    """ "sd3" | "flux" for a transformer ControlNet's keys (any layout), None otherwise."""
    try:
        return TRANSFORMER_FORMATS.get(detect_format(state))
    except CheckpointError:
        return None


# The text (T5) context's width: the input of the layer that embeds it, in diffusers' and in BFL's (XLabs) names.
TRANSFORMER_CONTEXT_KEYS = ("context_embedder.weight", "txt_in.weight")


def transformer_context_dim(state: dict) -> int | None:
    for key in TRANSFORMER_CONTEXT_KEYS:
        value = state.get(key)
        if value is not None:
            return int(value.shape[1])
    return None


def family_of_transformer_config(config: dict) -> Family:
    """The family of a diffusers SD3 / Flux transformer or ControlNet config (None width when it has none)."""
    arch = "flux" if "num_single_layers" in config or "axes_dims_rope" in config else "sd3"
    return Family(config.get("joint_attention_dim"), arch=arch)


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


# A union ControlNet (xinsir's Union/ProMax, model/union_controlnet.py) is a diffusers ControlNet with a front end;
# its task embedding (num_control_type, C_0) says how many condition types it knows.
UNION_TASK_KEY = "task_embedding"


FLUX_MODE_KEY = "controlnet_mode_embedder.weight"  # (num_mode, width): a Flux union net (InstantX, Shakker)


def flux_union_modes(state: dict) -> int | None:
    """A Flux union ControlNet's number of modes; None for any other file."""
    value = state.get(FLUX_MODE_KEY)
    return int(value.shape[0]) if value is not None else None


def union_types(state: dict) -> int | None:
    """A union ControlNet's number of condition types (from the task embedding's shape); None for any other file."""
    value = state.get(UNION_TASK_KEY)
    return int(value.shape[0]) if value is not None and value.dim() == 2 else None


@dataclass
class Inspection:
    format: str
    family: str | None  # "sd15" | "sd21" | "sdxl" | None (unknown, e.g. a tiny or custom model)
    num_parameters: int
    dtypes: list[str]
    num_control_outputs: int | None  # ControlNets only
    context_dim: int | None
    text_time: bool = False  # SDXL's added embedding (label_emb / add_embedding)
    arch: str = "unet"  # "unet" | "sd3" | "flux"
    layout: str | None = None  # who publishes this layout (transformer ControlNets)
    outputs_detail: str | None = None  # which base blocks the outputs feed (transformer ControlNets)
    condition_types: int | None = None  # a union ControlNet's number of condition types

    @property
    def base_family(self) -> Family:
        """What the file's model shares with its base (`check_family`)."""
        return Family(self.context_dim, self.text_time, self.arch)

    def describe(self) -> dict:
        lines = {"format": self.format}
        if self.layout is not None:
            lines["layout"] = self.layout
        outputs = self.num_control_outputs if self.num_control_outputs is not None else "-"
        if self.outputs_detail is not None:
            outputs = f"{outputs} ({self.outputs_detail})"
        family = {**FAMILY_NAMES, **TRANSFORMER_FAMILY_NAMES}.get(self.family, "unknown (pass a UNet config)")
        described = {
            **lines,
            "base family": family,
            "parameters": f"{self.num_parameters:,}",
            "dtype": ", ".join(self.dtypes),
            "control outputs": outputs,
        }
        if self.condition_types is not None:
            described["union types"] = _union_types_line(self.condition_types, self.arch)
        return described


def _union_types_line(count: int, arch: str = "unet") -> str:
    """'8: openpose/pose 0, depth 1, ...' (the publishers' names per id; Flux union nets have their own)."""
    from controlnet.model.union_controlnet import (  # light: no weights
        FLUX_UNION_MODES,
        UNION_TYPES,
        describe_types,
    )

    known = describe_types(count, FLUX_UNION_MODES if arch == "flux" else UNION_TYPES)
    return f"{count}: {known}" if known else str(count)


def detect_format(state: dict) -> str:
    """The format of a state dict from its key names (values may be meta tensors or None); what we cannot read is
    refused by name (`refuse_unreadable`)."""
    keys = list(state)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    contains = lambda part: any(part in k for k in keys)  # noqa: E731
    refuse_unreadable(state)
    # Transformer ControlNets (before the UNet rules: XLabs' files have an `input_hint_block` too); ComfyUI's
    # dispatch in comfy/controlnet.py tells them apart by the same keys.
    if has("controlnet_blocks."):
        if has("double_blocks."):
            return "xlabs-flux-controlnet"
        if contains(".adaLN_modulation."):
            return "stability-sd35-controlnet"
        if has("pos_embed_input."):
            return "diffusers-sd3-controlnet"
        if has("controlnet_x_embedder."):
            return "diffusers-flux-controlnet"
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


# Keys of what we cannot read, each with the sentence that names it (`refuse_unreadable`).
UNREADABLE_EXPECTED = (
    "expected a ControlNet in one of the layouts we read: original/diffusers UNet ControlNets; SD3/SD3.5 or Flux "
    "ControlNets in diffusers names (folder, InstantX, Shakker), XLabs' or Stability's layout"
)
# Fun / VACE-style control branches (alibaba-pai Fun ControlNets, VACE, Z-Image's controlnet): blocks injected at
# chosen layers through zero before_proj/after_proj, not a copy of the first N blocks.
FUN_VACE_PARTS = ("control_blocks.", "vace_blocks.", "vace_patch_embedding.", "control_img_in.", "control_layers.")
FUN_VACE_PARTS += ("control_all_x_embedder.", "control_noise_refiner.")
# Flux: the base's image input (BFL's `img_in`, diffusers' `x_embedder`) takes 64 packed latent channels; Flux Tools
# (FLUX.1-Canny/Depth-dev, the Control LoRAs) widen it to 128 to concatenate the control latents per token.
FLUX_LATENT_INPUTS = 64
FLUX_BASE_KEYS = (("double_blocks.", "single_blocks."), ("transformer_blocks.", "single_transformer_blocks."))
FLUX_IMAGE_INPUT_KEYS = ("img_in.weight", "x_embedder.weight")
FLUX_OUTPUT_KEYS = ("final_layer.linear.weight", "proj_out.weight")
LORA_PARTS = ("lora_A.", "lora_B.", "lora_down.", "lora_up.", ".lora.")


def _unprefixed(key: str) -> str:
    """A key without the wrappers single files put before the network (`model.diffusion_model.`, `transformer.`)."""
    for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def refuse_unreadable(state: dict) -> None:
    """Refuse, in one line naming it, a file we cannot read: fp8 "scaled" weights, a Flux Tools channel-concat model
    or Control LoRA, a Fun/VACE ControlNet. Keys (and, where given, shapes) only: nothing is read."""
    keys = [_unprefixed(k) for k in state]
    if any(k == "scaled_fp8" or k.endswith((".scale_weight", ".scale_input")) for k in keys):
        raise CheckpointError(
            "the file holds fp8 'scaled' weights (ComfyUI's scaled_fp8: float8 tensors with *.scale_weight factors), "
            f"which we do not read; use the bf16/fp16/fp32 release; {UNREADABLE_EXPECTED}"
        )
    if any(k.startswith(FUN_VACE_PARTS) for k in keys):
        raise CheckpointError(
            "the file holds a Fun/VACE-style ControlNet (control_blocks/vace_blocks injected through before_proj/"
            f"after_proj), which we do not read; {UNREADABLE_EXPECTED}"
        )
    if any(k.startswith("controlnet_") for k in keys):
        return
    shapes = {k: tuple(v.shape) for k, v in zip(keys, state.values(), strict=True) if v is not None}
    image_input = next((shapes[k] for k in FLUX_IMAGE_INPUT_KEYS if k in shapes), None)
    output = next((shapes[k] for k in FLUX_OUTPUT_KEYS if k in shapes), None)
    width = 2 * output[0] if output is not None else 2 * FLUX_LATENT_INPUTS  # twice the latents it predicts
    widened = image_input is not None and len(image_input) == 2 and image_input[1] == width
    flux = any(all(any(k.startswith(p) for k in keys) for p in pair) for pair in FLUX_BASE_KEYS)
    lora = any(part in k for k in keys for part in LORA_PARTS)
    # a Control LoRA ships the widened image input in full beside its low-rank deltas
    if (flux or lora) and (widened or (lora and any(k in FLUX_IMAGE_INPUT_KEYS for k in keys))):
        what = "Control LoRA" if lora else "model (FLUX.1-Canny/Depth-dev)"
        raise CheckpointError(
            f"the file holds a Flux Tools channel-concat {what}: the control latents are concatenated to the base's "
            f"input (128 input features, not a side network), which we do not read; {UNREADABLE_EXPECTED}"
        )


def count_transformer_outputs(keys) -> tuple[int, int]:
    """(joint/double-block outputs, single-block outputs) of a transformer ControlNet (`controlnet_blocks.N`,
    `controlnet_single_blocks.N`): one zero-initialised linear per copied block."""
    count = lambda prefix: sum(1 for k in keys if k.startswith(prefix) and k.endswith(".weight"))  # noqa: E731
    return count("controlnet_blocks."), count("controlnet_single_blocks.")


def _outputs_detail(fmt: str, double: int, single: int) -> str:
    if fmt == "xlabs-flux-controlnet":
        return f"{double} double-block outputs, repeated over the base's double blocks: block i takes i % {double}"
    if TRANSFORMER_FORMATS[fmt] == "flux":
        return f"{double} double + {single} single-block outputs; base block i takes output i // ceil(n_base / n_control)"
    return f"{double} block outputs; base block i takes output int(i / (n_base / n_control))"


def context_dim(state: dict) -> int | None:
    """Width of the text context the model cross-attends to (from any attn2.to_k weight)."""
    for key, value in state.items():
        if key.endswith("attn2.to_k.weight"):
            return int(value.shape[1])
    return None


def count_control_outputs(keys, fmt: str) -> int | None:
    """A ControlNet's number of outputs (zero convs: one per UNet skip + the middle block; 13 for SD1.5, 10 for
    SDXL) from the key names of format `fmt` (detect_format's); None when `fmt` is not a ControlNet."""
    if fmt in TRANSFORMER_FORMATS:
        return sum(count_transformer_outputs(keys))
    if fmt in ("original-controlnet", "original-combined"):
        return sum(1 for k in keys if k.endswith(".weight") and ("zero_convs." in k or "middle_block_out." in k))
    if fmt == "diffusers-controlnet":
        return sum(1 for k in keys if k.endswith(".weight") and k.startswith("controlnet_down_blocks.")) + 1
    return None


def inspect_state_dict(state: dict) -> Inspection:
    fmt = detect_format(state)
    if fmt in TRANSFORMER_FORMATS:
        params = {k: v for k, v in state.items() if k not in TRANSFORMER_NON_PARAMETERS}
        return Inspection(
            format=fmt,
            family=TRANSFORMER_FORMATS[fmt],
            num_parameters=sum(v.numel() for v in params.values()),
            dtypes=sorted({str(v.dtype).removeprefix("torch.") for v in params.values()}),
            num_control_outputs=count_control_outputs(state, fmt),
            context_dim=transformer_context_dim(state),
            arch=TRANSFORMER_FORMATS[fmt],
            layout=LAYOUT_PHRASES[fmt],
            outputs_detail=_outputs_detail(fmt, *count_transformer_outputs(state)),
            condition_types=flux_union_modes(state),
        )
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
        condition_types=union_types(counted) if fmt == "diffusers-controlnet" else None,
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
