"""A web-UI txt2img / img2img request -> the `GenerationJob` every front door builds (generate/jobs.py).

Defaults are the web UI's where the request omits a field: steps 50, cfg_scale 7.0, sampler "Euler", seed -1
(random; the seed used is reported in `info`). Width and height: the web UI's 512 is SD1.5's native size; an
omitted size here is the base's native size (512 for SD1.5, 64 for the built-in base), taken from the first
condition's aspect as `controlnet generate` does, so a request without a size never asks a 64 px base for 512 px.
A size the request gives is used as given (a positive multiple of the base's VAE factor, else 422).

Fields that ask for something we do not have are refused (422 naming the field) instead of ignored: hires fix
(`enable_hr: true`), `restore_faces`, `tiling`, scripts (`script_name`), styles, variation seeds
(`subseed_strength` > 0), other always-on scripts with arguments, override_settings other than
`sd_model_checkpoint` / `CLIP_stop_at_last_layers`, img2img's latent-upscale resize (3). Fields that only tune the
web UI's own machinery are accepted and not used: `s_churn`/`s_tmax`/`s_tmin`/`s_noise`, `mask_blur`,
`inpainting_fill`, `inpaint_full_res*` (the whole image is repainted where the mask is white), `save_images`
(the server never writes images), `do_not_save_*`, `firstphase_*`, `hr_*` while hires fix is off.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields

from PIL import ImageOps

from controlnet.generate.control_images import RESIZE_MODES
from controlnet.generate.options import GenerationJob, GenerationOptions
from controlnet.generate.samplers import SAMPLERS, canonical_sampler_name
from controlnet.serve.images import RequestImages
from controlnet.serve.limits import MAX_GUIDANCE, MAX_IMAGES, MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS
from controlnet.serve.models import UnknownModel
from controlnet.serve.webui.payload import PayloadError
from controlnet.serve.webui.units import UnitContext, WebUIUnit, find_unit_args, parse_units
from controlnet.settings_cli import meta

DEFAULT_STEPS = 50  # the web UI's API defaults (modules/api/models.py / processing.py)
DEFAULT_CFG_SCALE = 7.0
DEFAULT_SAMPLER = "Euler"
DEFAULT_DENOISING = 0.75
MAX_SEED = 2**32 - 1  # the web UI draws seeds in [0, 2**32)
# img2img resize_mode: 0 Just resize, 1 Crop and resize, 2 Resize and fill (RESIZE_MODES' order), 3 Just resize
# (latent upscale), which we do not have
OVERRIDE_KEYS = ("sd_model_checkpoint", "CLIP_stop_at_last_layers")
SCHEDULER_AUTOMATIC = ("", "automatic")
REFUSED_TRUE = {  # field -> what it would need
    "enable_hr": "hires fix (a second upscaled pass)",
    "restore_faces": "face restoration",
    "tiling": "tiling (seamless textures)",
}
IMAGE_FIELDS = ("init_images", "mask", "image", "input_image", "mask_image")


@dataclass
class WebUIRequest:
    """A parsed request: the job (n_iter of them, differing by seed) and what `info` reports."""

    job: GenerationJob
    units: list[WebUIUnit]
    n_iter: int
    seed: int
    sampler_name: str
    script_key: str = ""
    notes: list[str] = field(default_factory=list)

    def jobs(self) -> list[GenerationJob]:
        """One job per iteration; iteration i starts at seed + i * batch_size (the web UI's all_seeds)."""
        from dataclasses import replace

        options = self.job.options
        return [
            replace(self.job, options=replace(options, seed=self.seed + i * options.batch_size))
            for i in range(self.n_iter)
        ]


def parse_request(payload: dict, service, img2img: bool) -> WebUIRequest:
    """Check a txt2img / img2img body and build its job; PayloadError or ImageError naming the field at fault."""
    if not isinstance(payload, dict):
        raise PayloadError("body", f"expected a JSON object, got {type(payload).__name__}")
    _refuse_features(payload)
    # the request's values under their web-UI names, read with the web UI's defaults and ranges, then mapped
    # into the schema by the names the schema gives them (`webui_names`)
    given = _overrides(payload.get("override_settings"), service)
    given["prompt"] = _text(payload, "prompt")
    given["negative_prompt"] = _text(payload, "negative_prompt") or None
    given["steps"] = _int(payload, "steps", DEFAULT_STEPS, 1, MAX_STEPS)
    given["cfg_scale"] = _float(payload, "cfg_scale", DEFAULT_CFG_SCALE, 0.0, MAX_GUIDANCE)
    batch_size = given["batch_size"] = _int(payload, "batch_size", 1, 1, MAX_IMAGES)
    n_iter = _int(payload, "n_iter", 1, 1, MAX_IMAGES)
    if batch_size * n_iter > MAX_IMAGES:
        raise PayloadError("n_iter", f"batch_size x n_iter = {batch_size * n_iter} images; at most {MAX_IMAGES}")
    width = given["width"] = _size(payload, "width")
    height = given["height"] = _size(payload, "height")
    seed = _int(payload, "seed", -1, -1, MAX_SEED)
    if seed == -1:
        seed = random.randrange(MAX_SEED + 1 - MAX_IMAGES)
    given["seed"] = seed
    given["sampler_name"], sampler_label = _sampler(payload)
    given["eta"] = _float(payload, "eta", 0.0, 0.0, 1.0) if payload.get("eta") is not None else 0.0
    init_image = mask = None
    images = RequestImages(service.max_pixels)  # every image of this request draws on one pixel budget
    if img2img:
        init_image, mask, given["denoising_strength"], given["resize_mode"] = _img2img(payload, images)
        given["init_images"], given["mask"] = init_image, mask

    key, args = find_unit_args(payload.get("alwayson_scripts"))
    ctx = UnitContext(
        registry=service.registry,
        max_units=service.max_units,
        width=width,
        height=height,
        init_image=init_image,
        has_mask=mask is not None,
        images=images,
        where=f"alwayson_scripts.{key or 'ControlNet'}.args",
    )
    units = parse_units(args, ctx)
    values = from_webui(given)
    prompt, base = values.pop("prompt"), values.pop("base", service.current_base)
    job = GenerationJob(
        prompt=prompt, base=base, units=[u.unit for u in units], options=GenerationOptions(**values)
    )
    return WebUIRequest(job, units, n_iter, seed, sampler_label, key)


# ---------------------------------------------------------------------------------------------------------------
def _refuse_features(payload: dict) -> None:
    for key, feature in REFUSED_TRUE.items():
        if payload.get(key):
            raise PayloadError(key, f"{feature} is not available on this server; send {key}: false")
    if payload.get("script_name"):
        raise PayloadError(
            "script_name",
            f"script {payload['script_name']!r} is not available; this server runs "
            "no web-UI scripts (ControlNet units go in alwayson_scripts)",
        )
    if payload.get("styles"):
        raise PayloadError("styles", "prompt styles are not available on this server; put the text in the prompt")
    strength = payload.get("subseed_strength") or 0
    if isinstance(strength, (int, float)) and strength > 0:
        raise PayloadError("subseed_strength", "variation seeds are not available; send subseed_strength: 0")
    scripts = payload.get("alwayson_scripts") or {}
    if isinstance(scripts, dict):
        for name, script in scripts.items():
            if name.lower() == "controlnet":
                continue
            args = script.get("args") if isinstance(script, dict) else script
            if args is not None and not isinstance(args, list):
                raise PayloadError(
                    f"alwayson_scripts.{name}", f"expected an object with an args list, got {args!r}"
                )
            if args and args[0] is not False:
                raise PayloadError(f"alwayson_scripts.{name}", f"script {name!r} is not available on this server")


def _overrides(value, service) -> dict:
    """The base and the CLIP layer from override_settings, under their web-UI names (other keys are refused:
    they would be ignored)."""
    given = {}
    if not value:
        return given
    if not isinstance(value, dict):
        raise PayloadError("override_settings", f"expected an object, got {type(value).__name__}")
    for key, setting in value.items():
        where = f"override_settings.{key}"
        if key == "sd_model_checkpoint":
            try:
                given[where] = service.registry.base(setting).name
            except UnknownModel as err:
                raise PayloadError(where, str(err)) from None
        elif key == "CLIP_stop_at_last_layers":
            if isinstance(setting, bool) or not isinstance(setting, int) or not 1 <= setting <= 12:
                raise PayloadError(where, f"got {setting!r}; expected an integer in [1, 12] (1 = the last layer)")
            given[where] = setting - 1  # the web UI counts the last layer as 1; the schema counts layers skipped
        else:
            raise PayloadError(
                where, f"setting {key!r} is not available here; expected only {', '.join(OVERRIDE_KEYS)}"
            )
    return given


def webui_names() -> dict[str, str]:
    """{web-UI name: schema field} for every field of GenerationJob and GenerationOptions the web UI has (the
    `webui` names in generate/options.py): the one table between the two vocabularies."""
    return {
        meta(f, "webui"): f.name
        for cls in (GenerationJob, GenerationOptions)
        for f in fields(cls)
        if meta(f, "webui")
    }


def from_webui(given: dict) -> dict:
    """{schema field: value} of values read under their web-UI names (`webui_names`)."""
    names = webui_names()
    unknown = sorted(set(given) - set(names))
    assert not unknown, f"web-UI names without a schema field: {unknown}"  # a parser bug, not bad input
    return {names[key]: value for key, value in given.items()}


def _sampler(payload: dict) -> tuple[str, str]:
    """(our sampler key, its web-UI name) from sampler_name / sampler_index and the scheduler field."""
    name = payload.get("sampler_name") or payload.get("sampler_index") or DEFAULT_SAMPLER
    where = "sampler_name" if payload.get("sampler_name") else "sampler_index"
    schedule = payload.get("scheduler")
    if isinstance(schedule, str) and schedule.strip().lower() not in SCHEDULER_AUTOMATIC:
        if schedule.strip().lower() != "karras":
            raise PayloadError(
                "scheduler", f"schedule {schedule!r} is not available; expected automatic or Karras"
            )
        name = f"{name} Karras" if "karras" not in str(name).lower() else name
    try:
        key = canonical_sampler_name(str(name))
    except ValueError as err:
        raise PayloadError(where, str(err)) from None
    return key, SAMPLERS[key].display_name


def _img2img(payload: dict, images: RequestImages):
    inits = payload.get("init_images") or []
    if not isinstance(inits, list) or not inits:
        raise PayloadError("init_images", "expected a list with one base64 image")
    if len(inits) > 1:
        raise PayloadError("init_images", f"got {len(inits)} images; this server takes one init image per request")
    init = images.decode(inits[0], "init_images[0]")
    if init is None:
        raise PayloadError("init_images[0]", "expected a base64 image or a data: URI, got null")
    mask = images.decode(payload.get("mask"), "mask", blank_is_none=True)
    if mask is not None and payload.get("inpainting_mask_invert"):
        mask = ImageOps.invert(mask.convert("L"))  # 1 = repaint the black part
    strength = _float(payload, "denoising_strength", DEFAULT_DENOISING, 0.0, 1.0)
    if strength <= 0:
        raise PayloadError("denoising_strength", "got 0 (nothing would be repainted); expected 0 < strength <= 1")
    mode = payload.get("resize_mode", 0)
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode < len(RESIZE_MODES):
        raise PayloadError(
            "resize_mode",
            f"got {mode!r}; expected 0 (just resize), 1 (crop and resize) or 2 "
            "(resize and fill); 3 (latent upscale) is not available",
        )
    return init.convert("RGB") if init.mode not in ("RGB", "RGBA") else init, mask, strength, RESIZE_MODES[mode]


def _text(payload: dict, key: str) -> str:
    value = payload.get(key) or ""
    if not isinstance(value, str):
        raise PayloadError(key, f"expected a string, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise PayloadError(key, f"{len(value):,} characters; at most {MAX_PROMPT_CHARS:,}")
    return value


def _int(payload: dict, key: str, default: int, low: int, high: int) -> int:
    value = payload.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PayloadError(key, f"got {value!r}; expected an integer in [{low}, {high}]")
    return value


def _float(payload: dict, key: str, default: float, low: float, high: float) -> float:
    value = payload.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise PayloadError(key, f"got {value!r}; expected a number in [{low}, {high}]")
    return float(value)


def _size(payload: dict, key: str) -> int | None:
    value = payload.get(key)
    if value is None or value == 0:  # 0 / omitted: the base's native size (see the module docstring)
        return None
    return _int(payload, key, 0, 1, MAX_SIDE)


def echo_parameters(payload: dict) -> dict:
    """The request as the response's `parameters`, with every image payload replaced by None."""

    def strip(value, key=""):
        if key in IMAGE_FIELDS:
            return [None for _ in value] if isinstance(value, list) else (None if value is not None else None)
        if isinstance(value, dict):
            return {k: strip(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(payload)
