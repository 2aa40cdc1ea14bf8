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

from dataclasses import dataclass, field

from PIL import Image

from controlnet.generate.jobs import ControlUnit
from controlnet.generate.pipeline import INPAINT
from controlnet.serve.models import ModelEntry, UnknownModel
from controlnet.serve.webui.modules import NONE_MODULE, UNSET, Module, effective_value, find_module
from controlnet.serve.webui.payload import PayloadError, decode_image

SCRIPT_KEY = "controlnet"  # alwayson_scripts key, matched case-insensitively
NO_MODEL = ("", "none")
# resize_mode: the web UI's ResizeMode enum (0 RESIZE, 1 INNER_FIT, 2 OUTER_FIT) and every label it has used.
RESIZE_BY_INT = {0: "just_resize", 1: "crop_and_resize", 2: "resize_and_pad"}
RESIZE_BY_LABEL = {
    "just resize": "just_resize",
    "crop and resize": "crop_and_resize",
    "inner fit (scale to fit)": "crop_and_resize",
    "scale to fit (inner fit)": "crop_and_resize",
    "resize and fill": "resize_and_pad",
    "outer fit (shrink to fit)": "resize_and_pad",
    "envelope (outer fit)": "resize_and_pad",
}
RESIZE_LABEL = {
    "just_resize": "Just Resize",
    "crop_and_resize": "Crop and Resize",
    "resize_and_pad": "Resize and Fill",
}
DEFAULT_RESIZE = "Crop and Resize"  # the web UI's default
# control_mode: 0 Balanced, 1 My prompt is more important, 2 ControlNet is more important (generate/guidance.py).
MODE_BY_INT = {0: "balanced", 1: "prompt", 2: "controlnet"}
MODE_BY_LABEL = {"balanced": "balanced", "my prompt is more important": "prompt",
                 "controlnet is more important": "controlnet"}  # fmt: skip
MODE_LABEL = {"balanced": "Balanced", "prompt": "My prompt is more important",
              "controlnet": "ControlNet is more important"}  # fmt: skip
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
            ("Resize Mode", RESIZE_LABEL[self.unit.resize_mode]),
            ("Processor Res", self.effective["processor_res"]),
            ("Threshold A", self.effective["threshold_a"]),
            ("Threshold B", self.effective["threshold_b"]),
            ("Guidance Start", self.guidance_start),
            ("Guidance End", self.guidance_end),
            ("Pixel Perfect", self.pixel_perfect),
            ("Control Mode", MODE_LABEL[self.unit.mode]),
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
    image, mask = _images(unit, where)
    resize = _resize_mode(unit.get("resize_mode", DEFAULT_RESIZE), f"{where}.resize_mode")
    weight = _number(unit.get("weight", 1.0), f"{where}.weight", low=0.0)
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
    blocks = _block_scales(unit.get("advanced_weighting"), f"{where}.advanced_weighting")

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


def _images(unit: dict, where: str) -> tuple[Image.Image | None, Image.Image | None]:
    key = "image" if "image" in unit else "input_image"
    value = unit.get(key)
    mask_key = "mask" if "mask" in unit else "mask_image"
    mask_value = unit.get(mask_key)
    if isinstance(value, dict):  # {"image": ..., "mask": ...}
        image = decode_image(value.get("image"), f"{where}.{key}.image")
        inner = decode_image(value.get("mask"), f"{where}.{key}.mask")
    elif isinstance(value, (list, tuple)):  # [image, mask]
        if len(value) not in (1, 2):
            raise PayloadError(f"{where}.{key}", f"expected [image] or [image, mask], got {len(value)} entries")
        image = decode_image(value[0], f"{where}.{key}[0]")
        inner = decode_image(value[1], f"{where}.{key}[1]") if len(value) == 2 else None
    else:
        image, inner = decode_image(value, f"{where}.{key}"), None
    mask = decode_image(mask_value, f"{where}.{mask_key}") if mask_value is not None else None
    return image, (mask if mask is not None else inner)


def _resize_mode(value, where: str) -> str:
    if isinstance(value, bool):
        raise PayloadError(where, f"expected 0, 1, 2 or a label, got {value!r}")
    if isinstance(value, int) and value in RESIZE_BY_INT:
        return RESIZE_BY_INT[value]
    if isinstance(value, str) and value.strip().lower() in RESIZE_BY_LABEL:
        return RESIZE_BY_LABEL[value.strip().lower()]
    labels = ", ".join(repr(label) for label in RESIZE_LABEL.values())
    raise PayloadError(where, f"unknown resize mode {value!r}; expected 0, 1, 2 or one of {labels}")


def _control_mode(unit: dict, where: str) -> str:
    if "control_mode" not in unit and unit.get("guessmode"):  # legacy: guess mode = ControlNet is more important
        return "controlnet"
    value = unit.get("control_mode", 0)
    if isinstance(value, int) and not isinstance(value, bool) and value in MODE_BY_INT:
        return MODE_BY_INT[value]
    if isinstance(value, str) and value.strip().lower() in MODE_BY_LABEL:
        return MODE_BY_LABEL[value.strip().lower()]
    labels = ", ".join(repr(label) for label in MODE_LABEL.values())
    raise PayloadError(
        f"{where}.control_mode", f"unknown control mode {value!r}; expected 0, 1, 2 or one of {labels}"
    )


def _number(value, where: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PayloadError(where, f"expected a number, got {value!r}")
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


def _block_scales(value, where: str) -> list[float] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise PayloadError(where, "expected a list of numbers, one per ControlNet output (13 for SD1.5)")
    return [float(v) for v in value]


def pixel_perfect_resolution(source: tuple[int, int], target: tuple[int, int], resize: str) -> int:
    """The detect resolution that maps the condition image 1:1 onto the output (the web UI's "Pixel Perfect").

    The image is scaled by k = target / source per side; "Resize and Fill" fits it inside (min k), the other modes
    cover the target (max k); the detect resolution is the short side after that scaling.
    """
    (src_w, src_h), (dst_w, dst_h) = source, target
    k_h, k_w = dst_h / src_h, dst_w / src_w
    k = min(k_h, k_w) if resize == "resize_and_pad" else max(k_h, k_w)
    return int(round(k * min(src_h, src_w)))


def _annotator_options(module: Module, unit: dict, where: str, pixel_perfect: bool, resize: str,
                       source: Image.Image | None, ctx: UnitContext) -> tuple[dict, dict]:  # fmt: skip
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
