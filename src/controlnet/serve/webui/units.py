"""ControlNet units of a web-UI request (`alwayson_scripts.ControlNet.args`) -> the `ControlUnit`s of a job.

Every spelling clients send is accepted (sd-webui-controlnet 1.1.455 and the older ones webuiapi and plug-ins still
send): `input_image` for `image`, `mask_image` for `mask`, `lowvram`, `guidance` for `guidance_end`, `guessmode`,
int enums for `resize_mode` (0/1/2) and `control_mode` (0/1/2) besides their labels, images as raw base64, data
URIs, `{"image", "mask"}` or `[image, mask]`. -1 or an out-of-range `processor_res` / `threshold_a` / `threshold_b`
is the module's default, as upstream; the values used are kept for `info`. UI-only fields are ignored.

Where upstream silently generates without control (HTTP 200 with uncontrolled images: an unknown model or module,
an undecodable image, units past the unit count), we refuse with a 422 naming the unit and the field. A unit whose
`enabled` is false is skipped. Upstream's default for an omitted `enabled` is false, which silently drops units
that name a model; here an omitted `enabled` counts as true when the unit names a model, false otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image

from controlnet.generate.control_images import RESIZE_DISPLAY_NAMES, resize_mode
from controlnet.generate.guidance import CONTROL_MODES, control_mode
from controlnet.generate.jobs import ControlUnit
from controlnet.generate.pipeline import INPAINT
from controlnet.serve.images import RequestImages
from controlnet.serve.limits import MAX_BLOCK_SCALES, MAX_CONTROL_SCALE
from controlnet.serve.models import ModelEntry, UnknownModel
from controlnet.serve.webui.modules import NONE_MODULE, UNSET, Module, effective_value, find_module
from controlnet.serve.webui.payload import PayloadError

SCRIPT_KEY = "controlnet"  # alwayson_scripts key, matched case-insensitively
NO_MODEL = ("", "none")
# resize_mode and control_mode: ints 0/1/2 and every label the web UI has used are read, and the labels written, by
# the tables beside the enums (generate/control_images.py RESIZE_DISPLAY_NAMES, generate/guidance.py CONTROL_MODES).
DEFAULT_RESIZE = "crop_and_resize"  # the web UI's default ("Crop and Resize")
# Unit fields naming features we do not have: refused when set (value not None / not empty).
UNSUPPORTED_FIELDS = {
    "ipadapter_input": "IP-Adapter inputs",
    "effective_region_mask": "effective region masks",
    "animatediff_batch": "AnimateDiff batches",
}
UNSUPPORTED_MODEL_WORDS = {"ip-adapter": "IP-Adapter", "ip_adapter": "IP-Adapter", "instantid": "InstantID",
                           "t2iadapter": "T2I-Adapter", "t2i-adapter": "T2I-Adapter"}  # fmt: skip


@dataclass
class WebUIUnit:
    """One enabled unit: the job's `ControlUnit` plus what `info` reports about it."""

    index: int
    """Position in `args` (units that are skipped keep their numbers)."""
    module: Module
    model: ModelEntry
    unit: ControlUnit
    effective: dict = field(default_factory=dict)
    """processor_res, threshold_a, threshold_b as used (-1: the module does not read it)."""
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    save_detected_map: bool = True

    def infotext(self) -> str:
        """The web UI's "ControlNet N" entry of extra_generation_params."""
        values = [
            ("Module", self.module.name),
            ("Model", self.model.title),
            ("Weight", self.weight),
            ("Resize Mode", RESIZE_DISPLAY_NAMES[self.unit.resize_mode]),
            ("Processor Res", self.effective["processor_res"]),
            ("Threshold A", self.effective["threshold_a"]),
            ("Threshold B", self.effective["threshold_b"]),
            ("Guidance Start", self.guidance_start),
            ("Guidance End", self.guidance_end),
            ("Pixel Perfect", self.pixel_perfect),
            ("Control Mode", CONTROL_MODES[self.unit.mode].display_name),
        ]
        return ", ".join(f"{k}: {v}" for k, v in values)


def find_unit_args(alwayson_scripts, where: str = "alwayson_scripts") -> tuple[str, list]:
    """(the key used, the unit list) of the ControlNet script; ("", []) when the request has none."""
    if alwayson_scripts is None:
        return "", []
    if not isinstance(alwayson_scripts, dict):
        raise PayloadError(where, f"expected an object of scripts, got {type(alwayson_scripts).__name__}")
    for key, script in alwayson_scripts.items():
        if key.lower() != SCRIPT_KEY:
            continue
        args = script.get("args", []) if isinstance(script, dict) else script
        if not isinstance(args, list):
            raise PayloadError(f"{where}.{key}.args", f"expected a list of units, got {type(args).__name__}")
        return key, args
    return "", []


@dataclass
class UnitContext:
    """What units are parsed against."""

    registry: object
    """The server's ModelRegistry (`controlnet(name)`, `controlnets()`)."""
    max_units: int
    width: int | None
    height: int | None
    """The output size the request gave (pixel-perfect resolutions are derived from it; None: the image's own)."""
    init_image: Image.Image | None = None
    """img2img: the first init image (units without an image take it)."""
    has_mask: bool = False
    """img2img with an inpainting mask."""
    images: RequestImages = field(default_factory=RequestImages)
    """The request's image decoder: the server's per-image limit and the request's total (serve/images.py)."""
    where: str = "alwayson_scripts.ControlNet.args"


def parse_units(args: list, ctx: UnitContext) -> list[WebUIUnit]:
    """The enabled units of `args`, each checked; PayloadError (422) naming `args[k].field` for the first fault."""
    raw = [(k, u) for k, u in enumerate(args) if _enabled(u, f"{ctx.where}[{k}]")]
    if len(raw) > ctx.max_units:
        raise PayloadError(
            ctx.where,
            f"{len(raw)} enabled ControlNet units, over this server's limit of {ctx.max_units} (--max-units); "
            "upstream would drop the extra units silently, so none is run",
        )
    return [_parse_unit(k, u, ctx) for k, u in raw]


def _union_type(value, where: str) -> str | None:
    """sd-webui-controlnet's `union_control_type` ("OpenPose", "Hard Edge", ..., "Unknown"): a union net's condition
    type, checked against the net when the job runs (a 422 naming this field); "Unknown" = none named."""
    if value is None:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise PayloadError(where, f"expected a union type name such as 'Hard Edge' or 'Depth', got {value!r}")
    return str(value)


def _enabled(unit, where: str) -> bool:
    if not isinstance(unit, dict):
        raise PayloadError(where, f"expected a unit object, got {type(unit).__name__}")
    if "enabled" in unit:
        return _bool(unit["enabled"], f"{where}.enabled")
    return str(unit.get("model") or "").strip().lower() not in NO_MODEL


def _parse_unit(k: int, unit: dict, ctx: UnitContext) -> WebUIUnit:
    where = f"{ctx.where}[{k}]"
    for key, feature in UNSUPPORTED_FIELDS.items():
        if unit.get(key) not in (None, "", [], {}):
            raise PayloadError(f"{where}.{key}", f"{feature} are not supported by this server")
    try:
        module = find_module(unit.get("module", NONE_MODULE) or NONE_MODULE)
    except ValueError as err:
        raise PayloadError(f"{where}.module", str(err)) from None
    model = _model(unit.get("model"), ctx.registry, f"{where}.model")
    image, mask = _images(unit, where, ctx.images)
    resize = _resize_mode(unit.get("resize_mode", DEFAULT_RESIZE), f"{where}.resize_mode")
    weight = _number(unit.get("weight", 1.0), f"{where}.weight", 0.0, MAX_CONTROL_SCALE)
    start = _number(unit.get("guidance_start", 0.0), f"{where}.guidance_start", 0.0, 1.0)
    end_key = "guidance_end" if "guidance_end" in unit else "guidance"
    end = _number(unit.get(end_key, 1.0), f"{where}.{end_key}", 0.0, 1.0)
    if start > end:
        raise PayloadError(
            f"{where}.guidance_start", f"{start} is after guidance_end {end}; expected start <= end"
        )
    mode = _control_mode(unit, where)
    pixel_perfect = _bool(unit.get("pixel_perfect", False), f"{where}.pixel_perfect")
    save_map = _bool(unit.get("save_detected_map", True), f"{where}.save_detected_map")
    blocks = _block_scales(unit.get("advanced_weighting"), f"{where}.advanced_weighting", model)
    union_type = _union_type(unit.get("union_control_type"), f"{where}.union_control_type")

    if module.annotator == "inpaint":
        if ctx.init_image is None or not ctx.has_mask:
            raise PayloadError(
                f"{where}.module",
                "inpaint_only works in img2img with a mask: its condition is built from init_images[0] and mask",
            )
        if image is not None or mask is not None:
            raise PayloadError(
                f"{where}.image",
                "inpaint_only takes its image and mask from init_images[0] and mask; a unit's own image or mask "
                "is not supported",
            )
        condition = INPAINT
    else:
        if mask is not None:
            raise PayloadError(
                f"{where}.mask", f"only inpaint_only reads a unit mask; module {module.name} does not"
            )
        if image is None and ctx.init_image is None:
            raise PayloadError(
                f"{where}.image",
                "no image: txt2img units need their own image (img2img units take init_images[0])",
            )
        condition = image  # None: run_job takes the job's init image
    source = image or ctx.init_image
    options, effective = _annotator_options(module, unit, where, pixel_perfect, resize, source, ctx)
    control = ControlUnit(
        model=model.name,
        image=condition,
        annotator=None if module.annotator == "inpaint" else module.annotator,
        annotator_options=options,
        scale=weight,
        start=start,
        end=end,
        mode=mode,
        resize_mode=resize,
        block_scales=blocks,
        control_type=union_type,
    )
    return WebUIUnit(k, module, model, control, effective, weight, start, end, pixel_perfect, save_map)


# ---------------------------------------------------------------------------------------------------------------
# fields
def _model(name, registry, where: str) -> ModelEntry:
    if name is None or not isinstance(name, str) or name.strip().lower() in NO_MODEL:
        raise PayloadError(
            where, f"a ControlNet model is required (got {name!r}); expected one of {_titles(registry)}"
        )
    lowered = name.lower().replace(" ", "")
    feature = next((label for word, label in UNSUPPORTED_MODEL_WORDS.items() if word in lowered), None)
    try:
        return registry.controlnet(name)
    except UnknownModel:
        if feature:
            raise PayloadError(where, f"{name!r} is a {feature} model; this server has no {feature}") from None
        raise PayloadError(where, f"unknown model {name!r}; expected one of {_titles(registry)}") from None


def _titles(registry) -> str:
    return ", ".join(e.title for e in registry.controlnets()) or "(none: start the server with --models DIR)"


def _images(unit: dict, where: str, images: RequestImages) -> tuple[Image.Image | None, Image.Image | None]:
    def decode(value, field: str) -> Image.Image | None:  # "" and null: no image
        return images.decode(value, field, blank_is_none=True)

    key = "image" if "image" in unit else "input_image"
    value = unit.get(key)
    mask_key = "mask" if "mask" in unit else "mask_image"
    if isinstance(value, dict):  # {"image": ..., "mask": ...}
        image = decode(value.get("image"), f"{where}.{key}.image")
        inner = decode(value.get("mask"), f"{where}.{key}.mask")
    elif isinstance(value, (list, tuple)):  # [image, mask]
        if len(value) not in (1, 2):
            raise PayloadError(f"{where}.{key}", f"expected [image] or [image, mask], got {len(value)} entries")
        image = decode(value[0], f"{where}.{key}[0]")
        inner = decode(value[1], f"{where}.{key}[1]") if len(value) == 2 else None
    else:
        image, inner = decode(value, f"{where}.{key}"), None
    mask = decode(unit.get(mask_key), f"{where}.{mask_key}")
    return image, (mask if mask is not None else inner)


def _resize_mode(value, where: str) -> str:
    try:
        return resize_mode(value)
    except ValueError as err:
        raise PayloadError(where, str(err)) from None


def _control_mode(unit: dict, where: str) -> str:
    if "control_mode" not in unit and unit.get("guessmode"):  # legacy: guess mode = ControlNet is more important
        return "controlnet"
    try:
        return control_mode(unit.get("control_mode", 0)).name
    except ValueError as err:
        raise PayloadError(f"{where}.control_mode", str(err)) from None


def _number(value, where: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PayloadError(where, f"expected a number, got {value!r}")
    if not math.isfinite(value):
        raise PayloadError(where, f"got {value}; expected a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise PayloadError(where, f"got {value}; expected a number {bounds}")
    return float(value)


def _bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    raise PayloadError(where, f"expected true or false, got {value!r}")


def _block_scales(value, where: str, model: ModelEntry) -> list[float] | None:
    """`advanced_weighting`: one scale per output of the unit's ControlNet (13 for SD1.5, 10 for SDXL), shallowest
    skip first, the middle block last, multiplying that output's residual (ControlUnit.block_scales); null = none."""
    if value is None:
        return None
    outputs = model.num_control_outputs
    expected = f"{outputs} numbers, one per output of {model.name}" if outputs else "one number per output"
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise PayloadError(
            where, f"expected a list of {expected} (13 for SD1.5, 10 for SDXL), got {value!r}"[:300]
        )
    if outputs and len(value) != outputs:
        raise PayloadError(where, f"got {len(value)} numbers; expected {expected} (its skips + the middle block)")
    if len(value) > MAX_BLOCK_SCALES:
        raise PayloadError(where, f"got {len(value)} numbers; at most {MAX_BLOCK_SCALES}")
    # each scale multiplies one output as the weight multiplies all: the same finite range (NaN made a black image)
    return [_number(v, f"{where}[{i}]", -MAX_CONTROL_SCALE, MAX_CONTROL_SCALE) for i, v in enumerate(value)]


def pixel_perfect_resolution(source: tuple[int, int], target: tuple[int, int], resize: str) -> int:
    """The detect resolution that maps the condition image 1:1 onto the output (the web UI's "Pixel Perfect").

    The image is scaled by k = target / source per side; "Resize and Fill" fits it inside (min k), the other modes
    cover the target (max k); the detect resolution is the short side after that scaling.
    """
    (src_w, src_h), (dst_w, dst_h) = source, target
    k_h, k_w = dst_h / src_h, dst_w / src_w
    k = min(k_h, k_w) if resize == "resize_and_pad" else max(k_h, k_w)
    return int(round(k * min(src_h, src_w)))


def _annotator_options(
    module: Module,
    unit: dict,
    where: str,
    pixel_perfect: bool,
    resize: str,
    source: Image.Image | None,
    ctx: UnitContext,
) -> tuple[dict, dict]:
    """Our annotator's options from the unit's three numbers, and the effective values for `info`."""
    effective = {"processor_res": UNSET, "threshold_a": UNSET, "threshold_b": UNSET}
    if module.annotator is None or module.annotator == "inpaint":
        return {}, effective
    options = dict(module.fixed)
    for key, slider in module.sliders():
        value, _ = effective_value(module, slider, unit.get(key, UNSET))
        if key == "processor_res" and pixel_perfect and source is not None:
            target = (ctx.width or source.width, ctx.height or source.height)
            wanted = pixel_perfect_resolution(source.size, target, resize)
            value = max(slider.minimum, min(slider.maximum, wanted))
        options[slider.option] = value
        effective[key] = value
    _check_options(module, options, where)
    return options, effective


def _check_options(module: Module, options: dict, where: str) -> None:
    """Build a classical annotator once so that its own checks (canny: high >= low) name the unit; learned ones
    read weights when built, so they are checked when they run."""
    if module.weights is not None:
        return
    from controlnet.annotate.registry import get_annotator

    try:
        get_annotator(module.annotator, **options)
    except ValueError as err:
        option = str(err).split(":", 1)[0]
        key = next((k for k, s in module.sliders() if s.option == option), "module")
        raise PayloadError(f"{where}.{key}", str(err)) from None
