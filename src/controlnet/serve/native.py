"""The native API under /v1: typed requests (unknown fields refused), the service layer underneath.

GET  /v1/health                  version, device, queue depth, current base
GET  /v1/models                  bases and ControlNets (name, kind, family, condition, sha256; never a path)
GET  /v1/annotators              each annotator with the JSON schema of its options
POST /v1/annotate                image -> condition map
POST /v1/generate                synchronous: PNG base64 images + the effective settings
POST /v1/jobs                    asynchronous: -> id;  GET /v1/jobs/{id}: status and progress
GET  /v1/jobs/{id}/events        Server-Sent Events: `progress` per sampler step, then done | failed | cancelled
DELETE /v1/jobs/{id}             cancel (a running job stops at its next sampler step)
GET  /v1/jobs/{id}/images/{k}.png  image k as a PNG with the settings embedded (generate/outputs.py)
"""

from __future__ import annotations

import json
import weakref
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field

from controlnet import __version__
from controlnet.generate.options import ControlUnit, GenerationJob, GenerationOptions
from controlnet.generate.outputs import png_info
from controlnet.io.images import png_base64, png_bytes
from controlnet.serve.annotators import checked_options, describe_annotators
from controlnet.serve.images import RequestImages, decode_image
from controlnet.serve.limits import (
    MAX_BLOCK_SCALES,
    MAX_CONTROL_SCALE,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SIDE,
    MAX_STEPS,
)
from controlnet.serve.models import ModelGone
from controlnet.serve.problems import PROBLEM_JSON, ApiError, error_status
from controlnet.serve.request_models import Strict, request_model, settings_from_request
from controlnet.serve.service import (
    CANCELLED,
    DONE,
    AnnotationJob,
    Job,
    JobCancelled,
    Service,
    ServiceClosed,
    check_annotator,
    served_annotators,
)
from controlnet.serve.waiting import off_loop, wait_done

SSE_KEEPALIVE_S = 15.0
MAX_STREAMS_PER_JOB = 8  # event streams open on one job at once; more are a 429 (polling the job still works)
Image64 = Field(description="a base64 image or a data: URI (file paths are refused)")


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    field: str | None = None
    errors: list[dict] | None = None


# What one request may cost, on top of the schema's own bounds (generate/options.py): the server's prices.
# (the limits themselves are serve/limits.py's, shared with the web-UI API and the page)
UNIT_CAPS = {"model": {"max_length": 512}, "annotator": {"max_length": 64}, "scale": {"le": MAX_CONTROL_SCALE},
             "block_scales": {"max_length": MAX_BLOCK_SCALES}}  # fmt: skip
OPTION_CAPS = {"negative_prompt": {"max_length": MAX_PROMPT_CHARS}, "steps": {"le": MAX_STEPS},
               "seed": {"le": 2**63 - 1}, "width": {"ge": 1, "le": MAX_SIDE}, "height": {"ge": 1, "le": MAX_SIDE},
               "batch_size": {"le": MAX_IMAGES}, "guidance_scale": {"le": MAX_GUIDANCE},
               "scheduler": {"max_length": 64}}  # fmt: skip
UnitIn = request_model(ControlUnit, "UnitIn", UNIT_CAPS)
GenerateIn = request_model(
    GenerationOptions,
    "GenerateIn",
    OPTION_CAPS,
    prompt=(str, Field("", max_length=MAX_PROMPT_CHARS, description="What to draw.")),
    base=(
        str | None,
        Field(None, max_length=512, description="a base's name from GET /v1/models; null = the current base"),
    ),
    units=(list[UnitIn], Field(default_factory=list, description="ControlNet units (at most --max-units)")),
)


def _annotator_enum(schema: dict) -> None:
    """The served annotators as the field's `enum` in /openapi.json, listed when the schema is first asked for
    (not at import); requests are checked against the same list by `check_annotator` (422 naming the field)."""
    schema["enum"] = served_annotators()


class AnnotateIn(Strict):
    annotator: str = Field(
        description="an annotator from GET /v1/annotators", max_length=64, json_schema_extra=_annotator_enum
    )
    image: str = Image64
    options: dict[str, Any] = Field(default_factory=dict)


class Health(BaseModel):
    status: str
    version: str
    device: str
    queue_depth: int
    max_queue: int
    max_units: int
    current_base: str
    running: str | None


class ModelInfo(BaseModel):
    name: str
    kind: str
    family: str | None
    condition: str | None
    sha256: str | None = Field(description="the full file's sha256; null until the server has hashed it")
    hash8: str


class AnnotatorInfo(BaseModel):
    name: str
    options: dict[str, Any]


class AnnotateOut(BaseModel):
    annotator: str
    image: str
    width: int
    height: int


class GenerateOut(BaseModel):
    job: str
    images: list[str]
    seeds: list[int]
    settings: dict[str, Any]


class JobStatus(BaseModel):
    id: str
    kind: str
    state: str
    step: int
    total: int
    progress: float
    created: float
    started: float | None
    finished: float | None
    error: str | None
    error_type: str | None = Field(None, description="invalid | model_gone | cancelled | internal")
    images: int = 0
    settings: dict[str, Any] | None = None


def _problems(*codes: int) -> dict:
    return {c: {"model": Problem, "content": {PROBLEM_JSON: {}}, "description": "problem details"} for c in codes}


COMMON_ERRORS = (400, 401, 403, 413, 415, 422)


def decode_job(body, service: Service) -> GenerationJob:
    """The request as a GenerationJob: images decoded (bombs refused), annotator options checked."""

    images = RequestImages(service.max_pixels)  # every image of this request draws on one pixel budget

    def decode(value, where):
        return images.decode(value, where)

    units = []
    for k, u in enumerate(body.units):
        values = settings_from_request(ControlUnit, u, decode, f"units[{k}].")
        if u.annotator:
            values["annotator_options"] = checked_options(
                u.annotator, u.annotator_options, f"units[{k}].annotator", f"units[{k}].annotator_options"
            )
        elif u.annotator_options:
            raise ApiError(
                422, f"units[{k}].annotator_options: given without an annotator", f"units[{k}].annotator"
            )
        if u.image is None and body.init_image is None:
            raise ApiError(
                422, f"units[{k}].image: required without an init_image to take it from", f"units[{k}].image"
            )
        units.append(ControlUnit(**values))
    options = GenerationOptions(**settings_from_request(GenerationOptions, body, decode))
    return GenerationJob(prompt=body.prompt, base=body.base or service.current_base, units=units, options=options)


def submit_request(body, service: Service) -> Job:
    """Decode, check and queue a generation request; off the event loop (decoding, and the checks' file reads)."""
    return service.submit(decode_job(body, service))


def image_pnginfo(job: Job, k: int):
    result = job.result
    return png_info(result.settings, result.seeds[k], [u.model for u in job.spec.units])


async def wait_for(job: Job, request: Request, service: Service):
    """The job's result once it is done (its client gone: cancelled, 409; failed: its error as a problem)."""
    await wait_done(job, request, service)
    if job.state == DONE:
        return job.result
    raise_job_error(job)


def raise_job_error(job: Job):
    err = job.error
    if job.state == CANCELLED or isinstance(err, JobCancelled):
        raise ApiError(409, f"job {job.id} was cancelled")
    if isinstance(err, ModelGone):
        raise ApiError(409, job.error_text, getattr(err, "field", None) or err.kind)
    if isinstance(err, ValueError):
        raise ApiError(error_status(err), job.error_text, getattr(err, "field", None))
    raise RuntimeError(f"job {job.id} failed: {err}") from err  # a bug: the app's 500 handler logs it


def add_routes(app: FastAPI, service: Service) -> None:
    # job id -> its open event streams, weakly held: a finished or abandoned stream drops out by itself (an empty
    # set is pruned at the next stream's start)
    streams: dict[str, weakref.WeakSet] = {}
    r = APIRouter(prefix="/v1", tags=["native"], responses=_problems(*COMMON_ERRORS))

    def lookup(job_id: str) -> Job:
        job = service.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r} (unknown, or finished long ago and forgotten)", "job_id")
        return job

    def job_status(job: Job) -> JobStatus:
        extra = {}
        if job.state == DONE and job.kind == "generate":
            extra = {"images": len(job.result.images), "settings": job.result.settings}
        return JobStatus(**job.status(), **extra)

    @r.get("/health", response_model=Health, summary="server status")
    def health() -> Health:
        running = service.current()
        return Health(
            status="ok",
            version=__version__,
            device=str(service.device),
            queue_depth=service.queue_depth(),
            max_queue=service.max_queue,
            max_units=service.max_units,
            current_base=service.current_base,
            running=running.id if running else None,
        )

    @r.get("/models", response_model=list[ModelInfo], summary="bases and ControlNets this server can use")
    def models() -> list[ModelInfo]:
        return [ModelInfo(**e.describe()) for e in service.registry.all()]

    @r.get("/annotators", response_model=list[AnnotatorInfo], summary="annotators and their options' schemas")
    def annotators() -> list[AnnotatorInfo]:
        return [AnnotatorInfo(**a) for a in describe_annotators()]

    @r.post(
        "/annotate",
        response_model=AnnotateOut,
        responses=_problems(409, 429, 503),
        summary="turn an image into a condition map",
    )
    async def annotate(body: AnnotateIn, request: Request) -> AnnotateOut:
        check_annotator(body.annotator, {}, "annotator")
        options = checked_options(body.annotator, body.options, "annotator", "options")
        image = await off_loop(decode_image, body.image, "image", service.max_pixels)
        job = await off_loop(service.submit, AnnotationJob(body.annotator, image, options))
        result = await wait_for(job, request, service)
        encoded = await off_loop(png_base64, result)
        return AnnotateOut(annotator=body.annotator, image=encoded, width=result.width, height=result.height)

    @r.post(
        "/generate",
        response_model=GenerateOut,
        responses=_problems(409, 429, 503),
        summary="generate images (synchronous)",
    )
    async def generate(body: GenerateIn, request: Request) -> GenerateOut:
        job = await off_loop(submit_request, body, service)
        result = await wait_for(job, request, service)

        def encode() -> list[str]:
            return [png_base64(im, image_pnginfo(job, k)) for k, im in enumerate(result.images)]

        images = await off_loop(encode)
        return GenerateOut(job=job.id, images=images, seeds=result.seeds, settings=result.settings)

    @r.post(
        "/jobs",
        response_model=JobStatus,
        status_code=202,
        responses=_problems(429, 503),
        summary="submit a generation (asynchronous)",
    )
    async def submit(body: GenerateIn) -> JobStatus:
        return job_status(await off_loop(submit_request, body, service))

    @r.get("/jobs/{job_id}", response_model=JobStatus, responses=_problems(404), summary="a job's status")
    def status(job_id: str) -> JobStatus:
        return job_status(lookup(job_id))

    @r.delete("/jobs/{job_id}", response_model=JobStatus, responses=_problems(404), summary="cancel a job")
    def cancel(job_id: str) -> JobStatus:
        lookup(job_id)
        return job_status(service.cancel(job_id))

    @r.get(
        "/jobs/{job_id}/events",
        responses={**_problems(404), 200: {"content": {"text/event-stream": {}}}},
        response_class=StreamingResponse,
        summary="progress as Server-Sent Events",
    )
    async def events(job_id: str, request: Request):
        job = lookup(job_id)
        for key in [k for k, v in streams.items() if not v]:
            del streams[key]
        open_streams = streams.setdefault(job_id, weakref.WeakSet())
        if len(open_streams) >= MAX_STREAMS_PER_JOB:
            raise ApiError(
                429,
                f"job {job_id} already has {MAX_STREAMS_PER_JOB} event streams open; poll GET /v1/jobs/{job_id}",
                "job_id",
                headers={"Retry-After": "5"},
            )
        stream = job_events(job, request)
        open_streams.add(stream)  # leaves the set when the stream is finished or dropped (a weak reference)
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def job_events(job: Job, request: Request):
        """A job's Server-Sent Events: `progress` on each change, a keep-alive comment while nothing changes,
        then one `done` / `failed` / `cancelled`."""
        version, sent = -1, None
        while True:
            version = await job.changed(version, SSE_KEEPALIVE_S)
            status = job.status()
            if job.done:
                data = {**status, "images": len(job.result.images) if job.state == DONE else 0}
                yield f"event: {job.state}\ndata: {json.dumps(data)}\n\n"
                return
            if await request.is_disconnected():
                return
            key = (status["state"], status["step"])
            if key != sent:
                sent = key
                yield f"event: progress\ndata: {json.dumps(status)}\n\n"
            else:
                yield ": keep-alive\n\n"

    @r.get(
        "/jobs/{job_id}/images/{index}.png",
        responses={**_problems(404, 409), 200: {"content": {"image/png": {}}}},
        response_class=Response,
        summary="image k of a finished job, as a PNG with its settings",
    )
    def image(job_id: str, index: int):
        job = lookup(job_id)
        if job.kind != "generate":
            raise ApiError(404, f"job {job_id} is an annotation job; it has no generated images", "job_id")
        if job.state != DONE:
            if job.done:
                raise_job_error(job)
            raise ApiError(409, f"job {job_id} is {job.state}; images exist once it is done", "job_id")
        if not 0 <= index < len(job.result.images):
            raise ApiError(404, f"job {job_id} has {len(job.result.images)} images; no image {index}", "index")
        data = png_bytes(job.result.images[index], image_pnginfo(job, index))
        return Response(data, media_type="image/png")

    app.include_router(r)


__all__ = ["add_routes", "ServiceClosed"]
