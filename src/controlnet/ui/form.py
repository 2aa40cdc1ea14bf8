"""The page's form as plain values: form -> GenerationJob, job -> native API request, settings -> form.

No gradio here: the page (ui/page.py) hands its components' values over as a dict keyed by the names below, and
puts back what these functions return. So the page submits exactly the `GenerationJob` (generate/jobs.py) that the
native API builds for the same settings, and the "copy as API request" JSON is that job written as a POST /v1/generate
body: the same settings give the same pixels through either door
(docs/architecture.md#one-generation-one-description).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import typing
from dataclasses import dataclass

import numpy as np
from PIL import Image

from controlnet.config_docs import field_docs
from controlnet.generate.control_images import RESIZE_DISPLAY_NAMES, resize_mode
from controlnet.generate.guidance import CONTROL_MODES, control_mode
from controlnet.generate.options import ControlUnit, GenerationJob, GenerationOptions
from controlnet.generate.samplers import SAMPLERS, canonical_sampler_name
from controlnet.io.images import MAX_IMAGE_PIXELS, check_pixels
from controlnet.io.images import png_data_uri as data_uri
from controlnet.settings_cli import field_default, meta, scalar_type

MAX_UNITS = 3  # units on the page (the API takes up to --max-units)
NO_ANNOTATOR = "none"
BASE_DEFAULT = "base default"
# annotators that turn a photo into a map (the served ones minus those that take other inputs: inpaint takes an
# image with a mask, openpose_json takes keypoint JSON)
PHOTO_ANNOTATORS = (
    "canny",
    "lines",
    "scribble",
    "softedge",
    "lineart_standard",
    "normal",
    "shuffle",
    "tile",
    "invert",
)
MAX_SEED = 2**32 - 1

GENERAL_KEYS = (
    "prompt",
    "negative_prompt",
    "sampler",
    "steps",
    "guidance_scale",
    "seed",
    "batch_size",
    "width",
    "height",
    "init",
    "denoise",
)
UNIT_KEYS = (
    "enabled",
    "model",
    "photo",
    "annotator",
    "map",
    "scale",
    "start",
    "end",
    "mode",
    "resize",
    "control_type",
)
# the schema's unit fields the page shows (ControlUnit's ui=True fields) by their form key, where it differs
UNIT_FIELD_KEYS = {"resize_mode": "resize"}
NO_UNION_TYPE = "none"  # the union type dropdown's "no type named" (the unit's annotator's type, if it names one)
# plus unit{k}_options: the annotator's option values as a dict, which the page collects from its option controls


def unit_key(k: int, name: str) -> str:
    return f"unit{k}_{name}"


def form_keys() -> list[str]:
    """Every form value's name, in the order the page passes them."""
    more = [f.name for f in more_settings()]
    return [*GENERAL_KEYS, *more] + [unit_key(k, n) for k in range(MAX_UNITS) for n in UNIT_KEYS]


def sampler_choices() -> list[tuple[str, str]]:
    """(label, value) pairs for the sampler dropdown; BASE_DEFAULT = the base's own (sampling.json)."""
    return [(f"{BASE_DEFAULT}", BASE_DEFAULT)] + [(spec.display_name, name) for name, spec in SAMPLERS.items()]


def mode_choices() -> list[tuple[str, str]]:
    return [(mode.display_name, name) for name, mode in CONTROL_MODES.items()]


def resize_choices() -> list[tuple[str, str]]:
    return [(label, name) for name, label in RESIZE_DISPLAY_NAMES.items()]


def union_type_choices() -> list[tuple[str, str]]:
    """(label, value) pairs of a unit's union type dropdown: "none", then each condition type by its first name,
    labelled with its other names and its ids in the UNet union nets (xinsir's Union/ProMax) and the Flux union nets
    (model/union_controlnet.py UNION_TYPES, FLUX_UNION_MODES; the server checks the name against the net)."""
    from controlnet.serve.service import union_type_tables  # the page asks serve, never the model

    unet_table, flux_table = union_type_tables()
    unet_groups: dict[int, list[str]] = {}  # UNet union id -> its names
    for name, ident in unet_table.items():
        unet_groups.setdefault(ident, []).append(name)
    flux_only: dict[int, list[str]] = {}  # Flux union id -> its names that no UNet union net has
    for name, ident in flux_table.items():
        if name not in unet_table:
            flux_only.setdefault(ident, []).append(name)
    groups = [
        (names, i, next((flux_table[n] for n in names if n in flux_table), None))
        for i, names in unet_groups.items()
    ]
    groups += [(names, None, i) for i, names in flux_only.items()]
    choices = [(f"{NO_UNION_TYPE} (the annotator's type; plain ControlNets)", NO_UNION_TYPE)]
    for names, unet, flux in groups:
        ids = [f"union {unet}" if unet is not None else "", f"Flux union {flux}" if flux is not None else ""]
        choices.append((f"{' / '.join(names)} ({', '.join(i for i in ids if i)})", names[0]))
    return choices


def unit_docs() -> dict[str, str]:
    """Each unit field's docstring (the unit controls' hints)."""
    return field_docs(ControlUnit)


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


@dataclass
class FormError(ValueError):
    """A form value that cannot be used; `field` is the label the page shows."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def _image(value, label: str, max_pixels: int) -> Image.Image | None:
    if value is None:
        return None
    image = value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value))
    check_pixels(*image.size, label, max_pixels)
    return image


def editor_images(value, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image | None, Image.Image | None]:
    """gradio's ImageEditor value -> (init image RGB, mask L or None). The mask is what was painted on the
    image (any layer's pixels with alpha > 0, white = repaint); nothing painted = img2img without a mask."""
    if not value:
        return None, None
    background = _image(value.get("background"), "init image", max_pixels)
    if background is None:
        return None, None
    painted = np.zeros((background.height, background.width), dtype=bool)
    for layer in value.get("layers") or []:
        layer = _image(layer, "mask layer", max_pixels)
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA").resize(background.size))[..., 3]
        painted |= alpha > 0
    mask = Image.fromarray((painted * 255).astype(np.uint8), "L") if painted.any() else None
    return background.convert("RGB"), mask


def build_job(values: dict, base: str, max_pixels: int = MAX_IMAGE_PIXELS) -> GenerationJob:
    """The form's values (keys: form_keys()) as the job the service runs; FormError names a missing input.

    A unit's condition is its photo run through the annotator when both are set (so the settings record the
    module, as the web UI's do), else its map (uploaded, drawn, or an annotation result), else the init image."""
    init, mask = editor_images(values.get("init"), max_pixels)
    units = [_unit(values, k, init, max_pixels) for k in range(MAX_UNITS) if values.get(unit_key(k, "enabled"))]
    sampler = values.get("sampler")
    width, height = int(values.get("width") or 0), int(values.get("height") or 0)
    try:
        options = GenerationOptions(
            negative_prompt=values.get("negative_prompt") or None,
            seed=int(values.get("seed") or 0),
            steps=int(values["steps"]) if values.get("steps") else None,
            guidance_scale=float(values["guidance_scale"]) if values.get("guidance_scale") is not None else None,
            scheduler=None if sampler in (None, "", BASE_DEFAULT) else sampler,
            width=width or None,
            height=height or None,
            batch_size=int(values.get("batch_size") or 1),
            image=init,
            mask=mask,
            strength=float(values["denoise"]) if init is not None and values.get("denoise") else None,
            **{f.name: _typed(values[f.name], f) for f in more_settings() if values.get(f.name) is not None},
        )
    except ValueError as err:
        raise FormError("settings", str(err)) from None
    return GenerationJob(prompt=values.get("prompt") or "", base=base, units=units, options=options)


def more_settings() -> list[dataclasses.Field]:
    """The schema's settings that the page shows as generated controls ("More settings"): every
    `GenerationOptions` field not placed by hand (those say `ui=False` in generate/options.py)."""
    return [f for f in dataclasses.fields(GenerationOptions) if meta(f, "ui", True)]


def setting_docs() -> dict[str, str]:
    """Each schema field's docstring (the generated controls' hints)."""
    return field_docs(GenerationOptions)


def setting_kind(f: dataclasses.Field) -> type:
    """bool, int, float or str: what a generated control holds."""
    return scalar_type(meta(f, "kind") or typing.get_type_hints(GenerationOptions)[f.name]) or str


def _typed(value, f: dataclasses.Field):
    kind = setting_kind(f)
    return kind(value) if kind is not str else str(value)


def _unit(values: dict, k: int, init, max_pixels: int) -> ControlUnit:
    def get(name):
        return values.get(unit_key(k, name))

    label = f"unit {k + 1}"
    photo = _image(get("photo"), f"{label} photo", max_pixels)
    annotator = get("annotator") or NO_ANNOTATOR
    condition_map = _image(get("map"), f"{label} condition map", max_pixels)
    if photo is not None and annotator != NO_ANNOTATOR:
        image, module, options = photo.convert("RGB"), annotator, dict(get("options") or {})
    elif condition_map is not None:
        image, module, options = condition_map.convert("RGB"), None, {}
    elif init is not None:
        image, module, options = None, None, {}
    else:
        raise FormError(
            label,
            "no condition: upload a photo and pick an annotator, upload or draw a map, or give an init image",
        )
    if not get("model"):
        raise FormError(f"{label} model", "pick a ControlNet")
    return ControlUnit(
        model=get("model"),
        image=image,
        annotator=module,
        annotator_options=options,
        scale=float(get("scale")),
        start=float(get("start")),
        end=float(get("end")),
        mode=get("mode") or "balanced",
        resize_mode=get("resize") or "just_resize",
        control_type=None if get("control_type") in (None, "", NO_UNION_TYPE) else get("control_type"),
    )


def api_request(job: GenerationJob) -> dict:
    """The job as a POST /v1/generate body (serve/native.py, derived from the same schema), images as PNG data:
    URIs; settings at their defaults are left out."""
    units = []
    for unit in job.units:
        entry = _changed(
            unit, {"model": unit.model, "image": None if unit.image is None else data_uri(unit.image)}
        )
        if not unit.annotator:
            entry.pop("annotator_options", None)
        units.append(entry)
    body = {"prompt": job.prompt, "base": job.base, "units": units, **_changed(job.options, {})}
    for f in dataclasses.fields(GenerationOptions):
        if meta(f, "image") and getattr(job.options, f.name) is not None:
            body[meta(f, "api_name") or f.name] = data_uri(getattr(job.options, f.name))
    if job.options.image is None:
        body.pop("strength", None)
    return {k: v for k, v in body.items() if v is not None}


def _changed(settings, fixed: dict) -> dict:
    """The API fields of a schema object whose values differ from their defaults (images excluded), plus `fixed`."""
    out = dict(fixed)
    for f in dataclasses.fields(settings):
        if not meta(f, "api", True) or meta(f, "image") or f.name in fixed:
            continue
        value = getattr(settings, f.name)
        if value != field_default(f):
            out[meta(f, "api_name") or f.name] = value
    return out


def _canonical(value, canonical) -> str | None:
    """`value` (a name or its label, as settings carry it) as `canonical` spells it; None when it knows no such."""
    if not value:
        return None
    try:
        return canonical(str(value))
    except ValueError:
        return None


def form_from_settings(settings: dict, controlnet_names: list[str]) -> dict:
    """Form values (keys: form_keys(), only those the settings say) from one image's settings: our PNG JSON,
    a job's `GenerationResult.settings` with its seed, or a parsed web-UI infotext (generate/png_settings.py).

    Images are not in the settings: each unit keeps the condition it has. A ControlNet named in the settings
    that this server does not offer is matched by name without its `[hash8]`, else left as it is."""
    values: dict = {}
    for key in ("prompt", "negative_prompt"):
        if isinstance(settings.get(key), str):
            values[key] = settings[key]
    for key, kind in (("steps", int), ("guidance_scale", float), ("seed", int), ("width", int), ("height", int)):
        if settings.get(key) is not None:
            values[key] = kind(settings[key])
    sampler = _canonical(settings.get("scheduler") or settings.get("sampler"), canonical_sampler_name)
    if sampler:
        values["sampler"] = sampler
    if settings.get("strength") is not None:
        values["denoise"] = float(settings["strength"])
    for f in more_settings():
        if settings.get(f.name) is not None:
            with contextlib.suppress(TypeError, ValueError):  # another tool's value: the control keeps its own
                values[f.name] = _typed(settings[f.name], f)
    units = settings.get("controlnets") or []
    for k in range(MAX_UNITS):
        values[unit_key(k, "enabled")] = k < len(units)
        if k >= len(units):
            continue
        unit = units[k]
        model = _controlnet_name(unit.get("model"), controlnet_names)
        if model:
            values[unit_key(k, "model")] = model
        for key in ("scale", "start", "end"):
            if unit.get(key) is not None:
                values[unit_key(k, key)] = float(unit[key])
        mode = _canonical(unit.get("mode") or unit.get("mode_label"), lambda name: control_mode(name).name)
        if mode:
            values[unit_key(k, "mode")] = mode
        resize = _canonical(
            unit.get("resize_mode") or unit.get("resize_label") or settings.get("resize_label"), resize_mode
        )
        if resize:
            values[unit_key(k, "resize")] = resize
        union_type = unit.get("control_type")
        values[unit_key(k, "control_type")] = _union_choice(union_type)
        module = unit.get("module")
        if module in PHOTO_ANNOTATORS:
            values[unit_key(k, "annotator")] = module
    return values


def _union_choice(value) -> str:
    """A settings' union type (a name or id as given) as the dropdown's value: its group's first name, or "none"
    when none was named or the name is not one of ours."""
    if value is None or str(value).strip().lower() in ("", NO_UNION_TYPE):
        return NO_UNION_TYPE
    wanted = str(value).strip().lower().replace("-", "_").replace(" ", "_")
    for label, choice in union_type_choices()[1:]:
        names = label.split(" (")[0].split(" / ")
        if wanted in names:
            return choice
    return NO_UNION_TYPE


def _controlnet_name(name, offered: list[str]) -> str | None:
    if not name:
        return None
    if name in offered:
        return name
    bare = str(name).split(" [")[0].strip()
    for candidate in offered:
        if candidate.split(" [")[0] == bare or candidate.rsplit("/", 1)[-1] == bare:
            return candidate
    return None
