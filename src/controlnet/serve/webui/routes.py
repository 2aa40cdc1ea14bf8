"""The web-UI compatible routes: AUTOMATIC1111's `/sdapi/v1/*` subset and sd-webui-controlnet's `/controlnet/*`.

Each route parses the web UI's spelling (generation.py, units.py), builds the same `GenerationJob` /
`AnnotationJob` as the native API and runs it through the service (one queue, the loaded models), then answers in
the web UI's shapes (info.py). Errors are the app's problem+json (serve/problems.py), naming the field as the
request spelled it. Not served: `/sdapi/v1/cmd-flags` (it reveals the command line; upstream it leaked the UI
password) and the removed `/controlnet/txt2img`.
"""

from __future__ import annotations

import re
import time
from typing import Annotated

from fastapi import Body, FastAPI, Request

from controlnet.io.images import png_base64
from controlnet.serve.images import RequestImages
from controlnet.serve.native import _problems, wait_for
from controlnet.serve.problems import ApiError
from controlnet.serve.service import AnnotationJob, FieldError
from controlnet.serve.waiting import off_loop
from controlnet.serve.webui import modules as mods
from controlnet.serve.webui.generation import echo_parameters, parse_request, webui_names
from controlnet.serve.webui.info import build_response
from controlnet.serve.webui.payload import PayloadError, check_body
from controlnet.serve.webui.units import UNSET

CONTROLNET_API_VERSION = 3  # sd-webui-controlnet's API version (1.1.455)
# webuiapi reads "controlnet m2m" in the txt2img list as "ControlNet is installed" and then sends {"args": []}
# when a call has no units (otherwise its shared mutable default re-sends earlier units: webui-api.md).
SCRIPTS = {"txt2img": ["controlnet m2m"], "img2img": ["controlnet m2m"]}
MAX_DETECT_IMAGES = 16
JsonBody = Annotated[dict, Body()]  # the web UI's bodies are untyped objects; routes parse them
JOB_ERRORS = _problems(409, 429, 503)  # cancelled or client gone, queue full, shutting down (as /v1's job routes)
_UNIT_FIELD = re.compile(r"^units\[(\d+)\](?:\.(\w+))?")


def _api_error(err: PayloadError) -> ApiError:
    return ApiError(422, str(err), err.field)


def add_routes(app: FastAPI, service) -> None:
    """Add the web-UI compatible routes to `app`, backed by `service` (serve/service.py `Service`)."""

    async def generate(payload: dict, img2img: bool, request: Request) -> dict:
        try:
            check_body(payload)
            parsed = await off_loop(parse_request, payload, service, img2img)
        except PayloadError as err:
            raise _api_error(err) from None
        results = []
        for job in parsed.jobs():
            try:
                submitted = await off_loop(service.submit, job)
            except FieldError as err:  # a unit's field in the job's numbering -> the request's
                raise _request_field(err, parsed) from None
            results.append(await wait_for(submitted, request, service))
        base = service.registry.base(parsed.job.base)
        send = payload.get("send_images", True) is not False
        return await off_loop(build_response, parsed, results, echo_parameters(payload), base, send)

    @app.post("/sdapi/v1/txt2img", tags=["web-UI API"], responses=JOB_ERRORS)
    async def txt2img(payload: JsonBody, request: Request) -> dict:
        """Text to image with ControlNet units in `alwayson_scripts.ControlNet.args` (AUTOMATIC1111's API)."""
        return await generate(payload, False, request)

    @app.post("/sdapi/v1/img2img", tags=["web-UI API"], responses=JOB_ERRORS)
    async def img2img(payload: JsonBody, request: Request) -> dict:
        """Image to image / inpainting; a unit without an image takes `init_images[0]`."""
        return await generate(payload, True, request)

    @app.get("/sdapi/v1/scripts", tags=["web-UI API"])
    def scripts() -> dict:
        return SCRIPTS

    @app.get("/sdapi/v1/sd-models", tags=["web-UI API"])
    def sd_models() -> list:
        """The bases; `filename` is the registry name (the server's file system is never shown)."""
        return [
            {
                "title": e.title,
                "model_name": e.stem,
                "hash": e.hash8,
                "sha256": e.sha256,
                "filename": e.name,
                "config": None,
            }
            for e in service.registry.bases()
        ]

    @app.get("/sdapi/v1/options", tags=["web-UI API"])
    def get_options() -> dict:
        base = service.registry.base(service.current_base)
        return {
            "sd_model_checkpoint": base.title,
            "sd_checkpoint_hash": base.sha256,
            "CLIP_stop_at_last_layers": 1,
            "control_net_unit_count": service.max_units,
        }

    @app.post("/sdapi/v1/options", tags=["web-UI API"])
    def set_options(payload: JsonBody) -> dict:
        """Switch the base with `sd_model_checkpoint`. Any other key must keep the value GET reports: this
        server has no other global settings, and accepting a change it would not apply is a silent fallback.
        (A client may post back what it read.)"""
        current = get_options()
        for key, value in payload.items():
            if key != "sd_model_checkpoint" and (key not in current or current[key] != value):
                raise ApiError(
                    422,
                    f"{key}: this setting is not available here; POST /sdapi/v1/options changes "
                    "only sd_model_checkpoint",
                    key,
                )
        if "sd_model_checkpoint" in payload:
            try:
                service.set_base(payload["sd_model_checkpoint"])
            except ValueError as err:
                raise ApiError(422, f"sd_model_checkpoint: {err}", "sd_model_checkpoint") from None
        return get_options()

    @app.get("/sdapi/v1/samplers", tags=["web-UI API"])
    def samplers() -> list:
        from controlnet.generate.samplers import SAMPLERS

        return [{"name": s.display_name, "aliases": [key], "options": {}} for key, s in SAMPLERS.items()]

    @app.get("/sdapi/v1/progress", tags=["web-UI API"])
    def progress(skip_current_image: bool = False) -> dict:
        job = service.current()
        depth = service.queue_depth()
        state = {
            "skipped": False,
            "interrupted": False,
            "job": "",
            "job_count": depth,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": 0,
        }
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        fraction = job.step / job.total if job.total else 0.0
        elapsed = time.time() - (job.started or time.time())
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        state.update(
            job=job.id,
            interrupted=job.cancel_requested,
            sampling_step=job.step,
            sampling_steps=job.total,
            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        )
        return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": None, "textinfo": None}

    @app.post("/sdapi/v1/interrupt", tags=["web-UI API"])
    def interrupt() -> dict:
        """Cancel the running job at its next sampler step (its request answers 409)."""
        job = service.interrupt()
        return {"interrupted": None if job is None else job.id}

    @app.get("/controlnet/version", tags=["web-UI API"])
    def version() -> dict:
        return {"version": CONTROLNET_API_VERSION}

    @app.get("/controlnet/model_list", tags=["web-UI API"])
    def model_list(update: bool = False) -> dict:
        """ControlNets as `name [hash8]` (A1111's old hash); `update` is accepted (the registry is the scan)."""
        return {"model_list": [e.title for e in service.registry.controlnets()]}

    @app.get("/controlnet/module_list", tags=["web-UI API"])
    def module_list(alias_names: bool = False) -> dict:
        available = mods.available_modules()
        return {
            "module_list": [m.label if alias_names else m.name for m in available],
            "module_detail": {m.label if alias_names else m.name: mods.module_detail(m) for m in available},
        }

    @app.get("/controlnet/control_types", tags=["web-UI API"])
    def control_types() -> dict:
        return {"control_types": mods.control_types(service.registry.controlnets())}

    @app.get("/controlnet/settings", tags=["web-UI API"])
    def settings() -> dict:
        return {"control_net_unit_count": service.max_units}

    @app.post("/controlnet/detect", tags=["web-UI API"], responses=JOB_ERRORS)
    async def detect(payload: JsonBody, request: Request) -> dict:
        """Run a module on images (`controlnet_input_images` or webuiapi's `controlnet_images`)."""
        try:
            check_body(payload)
            key, module, options, images = await off_loop(_detect_request, payload, service)
        except PayloadError as err:
            raise _api_error(err) from None
        maps = []
        for i, image in enumerate(images):
            if module.annotator is None:
                maps.append(image)
                continue
            try:
                job = await off_loop(service.submit, AnnotationJob(module.annotator, image, options))
            except FieldError as err:  # the job's `image` is the request's i-th image
                field = f"{key}[{i}]" if err.field == "image" else err.field
                raise ApiError(422, f"{field}: {str(err).removeprefix(err.field + ': ')}", field) from None
            maps.append(await wait_for(job, request, service))
        return {"images": await off_loop(lambda: [png_base64(m) for m in maps]), "info": "Success"}


def _request_field(err: FieldError, parsed) -> Exception:
    """A job's FieldError as the request spelled the field: units[k]... -> alwayson_scripts.ControlNet.args[i]...,
    a setting -> its web-UI name."""
    match = _UNIT_FIELD.match(err.field)
    if not (match and int(match.group(1)) < len(parsed.units)):
        # a setting's field (e.g. guidance_scale refused on a Flux base) under its web-UI name (cfg_scale)
        name = {f: w for w, f in webui_names().items()}.get(err.field)
        if name is None:
            return err
        return ApiError(422, str(err).replace(err.field, name, 1), name)
    unit = parsed.units[int(match.group(1))]
    where = f"alwayson_scripts.{parsed.script_key or 'ControlNet'}.args[{unit.index}]"
    name = match.group(2)
    # a unit's setting under its web-UI name (control_type -> union_control_type, block_scales -> advanced_weighting)
    field = where + (f".{_unit_webui_names().get(name, name)}" if name else "") + err.field[match.end() :]
    return ApiError(422, str(err).replace(err.field, field, 1), field)


def _unit_webui_names() -> dict[str, str]:
    """{ControlUnit field: its web-UI unit key} (the `webui` names in generate/options.py)."""
    from dataclasses import fields

    from controlnet.generate.options import ControlUnit
    from controlnet.settings_cli import meta

    return {f.name: meta(f, "webui") for f in fields(ControlUnit) if meta(f, "webui")}


def _detect_request(payload: dict, service) -> tuple:
    """The images' field, the module, its options and the decoded RGB images of a detect request (PayloadError
    naming the field)."""
    key = "controlnet_input_images" if "controlnet_input_images" in payload else "controlnet_images"
    images = payload.get(key)
    if not isinstance(images, list) or not images:
        raise PayloadError(key, "expected a non-empty list of base64 images (controlnet_input_images)")
    if len(images) > MAX_DETECT_IMAGES:
        raise PayloadError(key, f"{len(images)} images; at most {MAX_DETECT_IMAGES} per request")
    try:
        module = mods.find_module(payload.get("controlnet_module", mods.NONE_MODULE) or mods.NONE_MODULE)
    except ValueError as err:
        raise PayloadError("controlnet_module", str(err)) from None
    if module.annotator == "inpaint":
        raise PayloadError("controlnet_module", "inpaint_only has no detected map; it runs inside img2img")
    budget = RequestImages(service.max_pixels)
    decoded = [budget.decode(v, f"{key}[{i}]") for i, v in enumerate(images)]
    for i, image in enumerate(decoded):
        if image is None:
            raise PayloadError(f"{key}[{i}]", "expected a base64 image or a data: URI, got null")
    options = dict(module.fixed)
    for field, slider in module.sliders():
        value, _ = mods.effective_value(module, slider, payload.get(f"controlnet_{field}", UNSET))
        options[slider.option] = value
    return key, module, options, [image.convert("RGB") for image in decoded]
