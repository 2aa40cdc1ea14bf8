"""The service layer under every route: typed jobs, one bounded queue, one worker per device, progress, cancel.

Every front door (native /v1, the web-UI compatible API, the web page) submits a `GenerationJob` (generate/jobs.py)
or an `AnnotationJob` here, so they share the queue, the loaded models and the pixels. The anchors' servers run
requests under one global lock with undefined overlap; here jobs run one at a time in submission order on the
device's worker thread, and a full queue is refused at once (`QueueFull`, HTTP 429 with Retry-After) instead of
piling requests up.

Models: bases are loaded once and kept (the last MAX_BASES used); ControlNets live in an LRU bounded by bytes
(`max_controlnet_mb`). Cancellation: the pipeline's progress callback raises `JobCancelled` at the next sampler
step, so a cancelled generation stops within one step and the worker moves on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from controlnet.generate.builtin_format import BUILTIN_BASES
from controlnet.generate.control_calls import REPAINT
from controlnet.generate.jobs import GenerationJob, annotate_image, run_job
from controlnet.generate.results import INPAINT
from controlnet.generate.sizes import check_size
from controlnet.generate.transformer_pipeline import refusals
from controlnet.serve.limits import MAX_CONTROL_SCALE, MAX_DETECT_PIXELS, MAX_PIXEL_STEPS, describe_budget
from controlnet.serve.models import TRANSFORMER_FAMILIES, ModelGone, ModelRegistry, UnknownModel

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
# why a job failed, as clients are told: their value was refused, a model's file has gone, cancelled, or our bug
INVALID, MODEL_GONE, CANCELLED_ERROR, INTERNAL = "invalid", "model_gone", "cancelled", "internal"
FINISHED = (DONE, FAILED, CANCELLED)
MAX_BASES = 2  # bases kept loaded (a switch back and forth costs no reload); each can be GBs
MAX_KEPT_JOBS = 64  # finished jobs kept for GET /v1/jobs/{id} and image downloads, oldest dropped first
DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_UNITS = 4
DEFAULT_MAX_CONTROLNET_MB = 2048
NATIVE_SIDE_ESTIMATE = 1024  # an unset output side is priced at the largest native size (SDXL's)
STEPS_ESTIMATE = 50  # unset steps are priced at the web UI's default
SECONDS_PER_QUEUED_JOB = 2.0  # Retry-After estimate per job ahead when no job has finished yet
# the server flags an SD3 / Flux single-file base may need (generate/commands.py BASE_FLAGS' keys), as a refusal
# names the one it lacks: `--t5 DIR`
FILE_BASE_FLAGS = (
    ("vae", "PATH"),
    ("clip_l", "DIR"),
    ("clip_g", "DIR"),
    ("t5", "DIR"),
    ("base_config", "FILE"),
    ("tokenizer", "DIR"),
)


class JobCancelled(Exception):
    """Raised inside a running job (from its progress callback) when it was cancelled."""


class QueueFull(Exception):
    """The bounded queue is full; try again after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: int):
        self.retry_after_s = retry_after_s
        super().__init__(f"the job queue is full; retry after {retry_after_s} s")


class FieldError(ValueError):
    """A job value that cannot be served; `field` names it as the request spelled it (e.g. units[1].model)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


# Annotator options a client may not set: a weights path would be a client-supplied file path, a device is the
# server's choice.
SERVER_ONLY_ANNOTATOR_OPTIONS = ("weights", "device")


def served_annotators() -> list[str]:
    """Annotators this server offers: the ones that need no weights file (no pretrained weights are shipped)."""
    from controlnet.annotate.registry import annotator_options, list_annotators

    return [n for n in list_annotators() if "weights" not in annotator_options(n)]


def check_annotator(name, options: dict, field: str) -> None:
    """Refuse an annotator this server does not offer, or options it does not have (FieldError naming them)."""
    from controlnet.annotate.registry import annotator_options

    offered = served_annotators()
    if name not in offered:
        raise FieldError(field, f"unknown annotator {name!r}; expected one of {', '.join(offered)}")
    valid = [k for k in annotator_options(name) if k not in SERVER_ONLY_ANNOTATOR_OPTIONS]
    for key in options:
        if key not in valid:
            raise FieldError(
                f"{field}_options.{key}" if field.endswith("annotator") else f"options.{key}",
                f"{name} has no option {key!r}; expected some of {', '.join(valid) or '(none)'}",
            )


def check_detect_size(name: str, options: dict, image, field: str) -> None:
    """Refuse an annotation whose working size (the image's short side scaled to detect_resolution, the long side
    following) is over MAX_DETECT_PIXELS, before it is queued: a 91-byte 1x1024 PNG asked for 512x524288."""
    from controlnet.annotate.image import detect_size
    from controlnet.annotate.registry import annotator_options

    f = annotator_options(name).get("detect_resolution")
    resolution = options.get("detect_resolution", f.default if f is not None else None)
    if resolution is None or not hasattr(image, "size"):
        return
    width, height = image.size
    try:
        detect_size(height, width, resolution, MAX_DETECT_PIXELS)
    except ValueError as err:
        raise FieldError(field, str(err).removeprefix("detect_resolution: ")) from None


def check_generation_cost(options, field: str = "steps") -> None:
    """Refuse a generation whose work (output pixels x sampler steps x images) is over MAX_PIXEL_STEPS, before it
    is queued; each factor is capped on its own too (serve/limits.py). An unset size is priced at the largest
    native size (1024 px a side), unset steps at the web UI's default (50)."""
    width, height = options.width or NATIVE_SIDE_ESTIMATE, options.height or NATIVE_SIDE_ESTIMATE
    steps = options.steps or STEPS_ESTIMATE
    work = width * height * steps * options.batch_size
    if work > MAX_PIXEL_STEPS:
        raise FieldError(
            field,
            f"{width}x{height} px x {steps} steps x {options.batch_size} images = {work:,} pixel-steps, over this "
            f"server's {MAX_PIXEL_STEPS:,} per job ({describe_budget()}); fewer steps, images or pixels",
        )


def union_type_tables() -> tuple[dict[str, int], dict[str, int]]:
    """The union condition types' names -> ids: the UNet union nets' (xinsir's Union/ProMax) and the Flux union nets'
    (model/union_controlnet.py UNION_TYPES, FLUX_UNION_MODES), for the page's selector."""
    from controlnet.model.union_controlnet import FLUX_UNION_MODES, UNION_TYPES

    return UNION_TYPES, FLUX_UNION_MODES


class ServiceClosed(RuntimeError):
    """The service is shutting down and takes no new jobs."""


@dataclass
class AnnotationJob:
    """Turn one image into a condition map by a named annotator (annotate/registry.py)."""

    annotator: str
    image: Any  # PIL image
    options: dict = field(default_factory=dict)


class Job:
    """One submitted job: its state, progress and outcome. Thread-safe; waiters are woken on every change."""

    def __init__(self, spec):
        self.id = uuid.uuid4().hex
        self.spec = spec
        self.kind = "annotate" if isinstance(spec, AnnotationJob) else "generate"
        self.state = QUEUED
        self.step, self.total = 0, (1 if self.kind == "annotate" else 0)
        self.result = None
        self.error: BaseException | None = None
        self.error_type: str | None = None  # ERROR_TYPES: what a client may be told of a failure
        self.error_text: str | None = None  # the failure in words fit for a client (no paths, no internals)
        self.created, self.started, self.finished = time.time(), None, None
        self.version = 0  # +1 on every change: SSE sends what changed since the version it last saw
        self._cancel = threading.Event()
        self._changed = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    @property
    def done(self) -> bool:
        return self.state in FINISHED

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def _update(self, **values) -> None:
        with self._changed:
            for key, value in values.items():
                setattr(self, key, value)
            self.version += 1
            self._changed.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_wake, future)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is finished (True) or `timeout` passes (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.done, timeout)

    def wait_change(self, version: int, timeout: float | None = None) -> int:
        """Block until the job changed after `version` (or finished, or `timeout`); returns the current version."""
        with self._changed:
            self._changed.wait_for(lambda: self.version != version or self.done, timeout)
            return self.version

    async def changed(self, version: int, timeout: float) -> int:
        """`wait_change` for the event loop: waits without holding a thread (60 event streams on a queued job
        held 60 of the thread pool's 40 workers and froze every synchronous route), returns the current version."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._changed:
            if self.version != version or self.done:
                return self.version
            self._async_waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            with self._changed:
                if (loop, future) in self._async_waiters:
                    self._async_waiters.remove((loop, future))
        return self.version

    def status(self) -> dict:
        """JSON-able state (no result payloads, no paths)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "step": self.step,
            "total": self.total,
            "progress": (self.step / self.total) if self.total else (1.0 if self.state == DONE else 0.0),
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "error": self.error_text,
            "error_type": self.error_type,
        }


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _inpaint_unit(unit, table: dict) -> bool:
    """A unit whose condition the pipeline builds from the init image and mask, on a net whose types include repaint:
    it runs as type repaint when it names none (generate/control_calls.py `union_type_of`)."""
    return isinstance(unit.image, str) and unit.image == INPAINT and REPAINT in table


class Service:
    """Jobs in, results out; see the module docstring. `registry` says which models exist."""

    def __init__(
        self,
        registry: ModelRegistry,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_units: int = DEFAULT_MAX_UNITS,
        device: str | None = None,
        max_controlnet_mb: float = DEFAULT_MAX_CONTROLNET_MB,
        dtype=None,
        base_options: dict | None = None,
        threads: int | None = None,
        max_pixels: int | None = None,
    ):
        import torch

        if max_queue < 1 or max_units < 1:
            raise ValueError(f"max_queue={max_queue}, max_units={max_units}: expected integers >= 1")
        if threads:
            torch.set_num_threads(threads)
        self.registry = registry
        self.max_queue, self.max_units = max_queue, max_units
        self.max_pixels = max_pixels
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.max_controlnet_bytes = int(max_controlnet_mb * 2**20)
        self.base_options = dict(base_options or {})
        self.current_base = registry.default_base
        # SD3 / Flux single-file bases as check_base found them: name -> (file version, BaseSource or None, refusal)
        self._file_bases: dict[str, tuple[tuple[int, int], Any, str | None]] = {}
        # what would fail every request is refused now, naming the server's flag (a server that started and then
        # answered each request "pass tokenizer DIR" told API clients to fix what only the operator can)
        self.check_base(registry.base(registry.default_base), "--base")
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: Job | None = None
        self._lock = threading.Condition()
        self._closed = False
        self._bases: OrderedDict[str, Any] = OrderedDict()
        self._facts: dict[str, tuple[int, int]] = {}
        self._guidance_embeds: dict[str, bool] = {}  # transformer base name -> its transformer config's
        self._families_checked: dict[
            tuple[str, str], str | None
        ] = {}  # (controlnet, base) -> refusal or None  # base name -> (VAE factor, text encoder layers), once loaded
        # ControlNet name -> (file version, its union types or None, the type table): read once per file version
        self._union_counts: dict[str, tuple[tuple[int, int], int | None, dict]] = {}
        self._nets: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self._durations: deque[float] = deque(maxlen=8)
        self._worker = threading.Thread(target=self._work, name=f"controlnet-worker-{self.device}", daemon=True)
        self._worker.start()

    # ---------------------------------------------------------------------------------------------------
    # submitting and following jobs
    def check(self, spec):
        """The job as it will run, its model names resolved to the registry's (a copy: `spec` is not changed);
        refuses a job that cannot run (ValueError / UnknownModel naming the field) before it is queued."""
        if isinstance(spec, AnnotationJob):
            check_annotator(spec.annotator, spec.options, "annotator")
            check_detect_size(spec.annotator, spec.options, spec.image, "image")
            return spec
        if not isinstance(spec, GenerationJob):
            raise TypeError(f"expected a GenerationJob or AnnotationJob, got {type(spec).__name__}")
        if len(spec.units) > self.max_units:
            raise FieldError(
                "units",
                f"{len(spec.units)} units; this server takes at most {self.max_units} "
                "(--max-units); none is dropped silently",
            )
        try:
            base_entry = entry = self.registry.base(spec.base or self.current_base)
        except UnknownModel as err:
            err.field = "base"
            raise
        self.check_base(entry, "base")
        base = entry.name
        units = []
        for k, unit in enumerate(spec.units):
            try:
                entry = self.registry.controlnet(unit.model)
            except UnknownModel as err:
                err.field = f"units[{k}].model"
                raise
            self._check_family(entry, self.registry.base(base), f"units[{k}].model")
            if unit.annotator:
                check_annotator(unit.annotator, unit.annotator_options, f"units[{k}].annotator")
                image = unit.image if unit.image is not None else spec.options.image
                check_detect_size(unit.annotator, unit.annotator_options, image, f"units[{k}].image")
            self._check_union_type(unit, entry, f"units[{k}].control_type")
            outputs = entry.num_control_outputs
            for i, value in enumerate(unit.block_scales or []):
                if not abs(value) <= MAX_CONTROL_SCALE:  # 1e308 overflowed the residuals into a black image
                    raise FieldError(
                        f"units[{k}].block_scales[{i}]",
                        f"got {value}; expected a number in [-{MAX_CONTROL_SCALE:g}, {MAX_CONTROL_SCALE:g}]",
                    )
            if unit.block_scales is not None and outputs and len(unit.block_scales) != outputs:
                raise FieldError(
                    f"units[{k}].block_scales",
                    f"got {len(unit.block_scales)} values; {entry.name} "
                    f"has {outputs} outputs (its skips + the middle block), one scale each",
                )
            units.append(replace(unit, model=entry.name))
        checked = replace(spec, base=base, units=units)
        checked.check()
        check_generation_cost(checked.options)
        if base_entry.family in TRANSFORMER_FAMILIES:
            self._check_transformer_job(checked, base_entry)
        else:
            self._check_fused_types(checked)
        self._check_against_base(checked)
        return checked

    def _check_fused_types(self, job: GenerationJob) -> None:
        """Units of one union net that would run as one fused call (generate/control_calls.py `fusion_groups`) must
        name different types, at most the net's count: a FieldError naming the later unit's `control_type` before
        queueing (the pipeline would refuse it only after loading the nets)."""
        from controlnet.generate.control_calls import FusionError, fusion_groups
        from controlnet.model.union_controlnet import type_id

        types, counts = [], []
        for unit in job.units:
            count, table = self.union_types(self.registry.controlnet(unit.model))
            name = unit.control_type if unit.control_type is not None else unit.annotator
            name = REPAINT if unit.control_type is None and _inpaint_unit(unit, table) else name
            types.append(None if count is None else type_id(name, count, table))  # checked above
            counts.append(count)
        per_net = job.options.with_units(list(job.units)).per_net(len(job.units))
        try:
            fusion_groups([u.model for u in job.units], per_net, types, counts)
        except FusionError as err:
            raise FieldError(f"units[{err.unit}].control_type", str(err)) from None

    def _check_transformer_job(self, job: GenerationJob, base) -> None:
        """What the transformer pipeline refuses (generate/transformer_pipeline.py `refusals`: img2img, other
        samplers, non-balanced modes, ...) is a FieldError naming the setting before queueing, not a failed job."""
        if not job.units:
            raise FieldError(
                "units", f"none given; a generation on {base.name} (an SD3/Flux base) needs a ControlNet unit"
            )
        if base.name not in self._guidance_embeds and base.path.is_file():
            source, _ = self._file_base(base)  # checked by check_base: a refusal was raised there
            self._guidance_embeds[base.name] = source is None or source.plan.guidance
        if base.name not in self._guidance_embeds:
            try:
                config = json.loads((base.path / "transformer" / "config.json").read_text())
                self._guidance_embeds[base.name] = bool(config.get("guidance_embeds", True))
            except (OSError, ValueError):
                self._guidance_embeds[base.name] = True  # unreadable: the loader reports it in its own words
        problems = refusals(
            job.options.with_units(job.units), base.family, len(job.units), self._guidance_embeds[base.name]
        )
        if problems:
            raise FieldError(problems[0][0], "; ".join(message for _, message in problems))

    def _check_against_base(self, job: GenerationJob) -> None:
        """The checks that need the base's own numbers (its VAE factor, its text encoders' depth), before queueing
        once the base has been loaded (the first job of a base meets them in the worker, as a 422 all the same)."""
        facts = self._facts.get(job.base)
        if facts is None:
            return
        factor, layers = facts
        opts = job.options
        try:
            check_size(opts.width, opts.height, factor)
        except ValueError as err:
            raise FieldError(
                "width" if opts.width is not None and opts.width % factor else "height", str(err)
            ) from None
        if opts.clip_skip is not None and opts.clip_skip >= layers:
            raise FieldError(
                "clip_skip",
                f"got {opts.clip_skip}; this base's text encoder has {layers} layers, expected < {layers}",
            )

    def _check_family(self, controlnet, base, field: str) -> None:
        """A ControlNet of another base family (an SDXL one with an SD1.5 base) is refused before queueing, from
        the files' headers (generate/base.py check_controlnet_families: milliseconds; the load it spares took 13 s
        and ended in a key-by-key mismatch). The answer is kept per pair: a file's family does not change."""
        key = (controlnet.name, base.name)
        if key not in self._families_checked:
            from controlnet.generate.base import BaseSource, base_kind, check_controlnet_families

            try:
                source = self._file_base(base)[0] if self._is_transformer_file(base) else None
                if source is None:
                    kind, path = base_kind(base.name if base.name in BUILTIN_BASES else base.path)
                    arch = base.family if base.family in TRANSFORMER_FAMILIES else "unet"
                    source = BaseSource(kind, path, base.name, arch=arch)
                check_controlnet_families(source, [controlnet.path], flags={"base": "base"})
                self._families_checked[key] = None
            except ValueError as err:
                self._families_checked[key] = str(err).splitlines()[0]
        refusal = self._families_checked[key]
        if refusal is not None:
            raise FieldError(field, refusal)

    def union_types(self, entry) -> tuple[int | None, dict]:
        """(number of condition types, the type table) of a ControlNet (registry entry) from its file's header: a
        UNet union net's task embedding (io/formats.py `union_types`), a Flux union net's mode embedder
        (`flux_union_modes`); (None, {}) for a plain net. Read once per file version (size, mtime)."""
        from controlnet.io.inspect import inspect_path
        from controlnet.model.union_controlnet import FLUX_UNION_MODES, UNION_TYPES

        weights = entry.weights
        try:
            stat = weights.stat()
        except FileNotFoundError:
            raise ModelGone(entry.name, "controlnet") from None
        version = (stat.st_size, stat.st_mtime_ns)
        cached = self._union_counts.get(entry.name)
        if cached is None or cached[0] != version:
            try:
                found = inspect_path(weights)
                count, table = found.condition_types, FLUX_UNION_MODES if found.arch == "flux" else UNION_TYPES
            except (ValueError, OSError):  # unreadable: the loader refuses it in its own words
                count, table = None, {}
            cached = self._union_counts[entry.name] = (version, count, table if count is not None else {})
        return cached[1], cached[2]

    def _check_union_type(self, unit, entry, field: str) -> None:
        """A union ControlNet's unit needs a condition type the net knows (its own, or its annotator's where that
        names one, as generate/jobs.py `union_type_from_annotator` fills it); a plain net takes none. A FieldError
        names `field` and the types the net supports, before queueing (the pipeline would refuse it at run time)."""
        from controlnet.model.union_controlnet import describe_types, type_id

        count, table = self.union_types(entry)
        if count is None:
            if unit.control_type is not None:
                raise FieldError(
                    field,
                    f"got {unit.control_type!r}, but {entry.name} is not a union ControlNet: only union nets "
                    "(xinsir's Union/ProMax, the Flux union nets) take a condition type; give none",
                )
            return
        supported = f"{entry.name} is a union ControlNet of {count} types: {describe_types(count, table)}"
        name = unit.control_type
        inpaint = _inpaint_unit(unit, table)
        if name is None and inpaint:
            name = REPAINT  # generate/control_calls.py union_type_of: a union net's inpainting unit is of type repaint
        if name is None and unit.annotator:
            try:
                type_id(unit.annotator, count, table)
                name = unit.annotator
            except ValueError:
                pass
        if name is None:
            raise FieldError(field, f"none given; name the condition's type by name or id ({supported})")
        try:
            found = type_id(name, count, table)
        except ValueError:
            given = f"got {name!r}" if unit.control_type is not None else "none given (an inpaint unit: repaint)"
            raise FieldError(field, f"{given}, a type this net does not have; {supported}") from None
        if inpaint and found != table[REPAINT]:
            raise FieldError(
                field,
                f"got {name!r} for an inpaint unit, whose condition is the repaint type's; give repaint or none",
            )

    def check_base(self, entry, field: str) -> None:
        """A single-file base that cannot load with the server's flags is a FieldError naming the flag: an SD3 / Flux
        file as the loader checks it (generate/base.py `check_base`: headers and tokenizers, no weights; once per
        file version), a UNet checkpoint file without --tokenizer (it holds none)."""
        if self._is_transformer_file(entry):
            refusal = self._file_base(entry)[1]
            if refusal is not None:
                raise FieldError(field, refusal)
        elif entry.path.is_file() and not self.base_options.get("tokenizer"):
            raise FieldError(
                field,
                f"{entry.name} is a single checkpoint file, which holds no tokenizer, and this server was started "
                "without --tokenizer DIR (a server flag: the tokenizer/ folder of any diffusers SD model)",
            )

    @staticmethod
    def _is_transformer_file(entry) -> bool:
        return entry.family in TRANSFORMER_FAMILIES and entry.path.is_file()

    def _load_options(self, entry) -> dict:
        """The loader's keywords for this base: every base option for an SD3 / Flux file (its parts, --base-config),
        only --tokenizer for the others (a part or --base-config given for a folder is refused by the loader)."""
        if self._is_transformer_file(entry):
            flags = {**self._flags(), "base": "base"}
            return {**self.base_options, "flags": flags}
        return {k: v for k, v in self.base_options.items() if k == "tokenizer"}

    def _flags(self) -> dict:
        """The loader's option names as this server's flags (`serve` passes generate/commands.py BASE_FLAGS)."""
        return {key: "--" + key.replace("_", "-") for key, _ in FILE_BASE_FLAGS} | self.base_options.get(
            "flags", {}
        )

    def _file_base(self, entry) -> tuple[Any, str | None]:
        """(BaseSource, None) of an SD3 / Flux single-file base as `check_base` found it, or (None, the refusal in
        one line for clients); checked once per file version (size, mtime), as family checks are kept per pair."""
        try:
            stat = entry.path.stat()
        except FileNotFoundError:
            raise ModelGone(entry.name, "base") from None
        version = (stat.st_size, stat.st_mtime_ns)
        cached = self._file_bases.get(entry.name)
        if cached is None or cached[0] != version:
            from controlnet.generate.base import check_base

            try:
                source, refusal = check_base(entry.path, **self._load_options(entry)), None
            except (ValueError, OSError) as err:
                source, refusal = None, self._file_refusal(entry, err)
            cached = self._file_bases[entry.name] = (version, source, refusal)
        return cached[1], cached[2]

    def _file_refusal(self, entry, err: BaseException) -> str:
        """The loader's line for a file base it refused, as a client may read it: the server flag it lacks named
        first (only the operator can give it), paths cut to names."""
        flags = self._flags()
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        text = text.replace(str(entry.path), entry.name)
        for root in self.registry.roots:
            text = text.replace(f"{root}/", "").replace(str(root), "the models folder")
        for value in self.base_options.values():
            if isinstance(value, str):  # a server flag's path: its last name only
                text = text.replace(value.rstrip("/"), Path(value).name)
        for key, metavar in FILE_BASE_FLAGS:
            flag = flags[key]
            if not self.base_options.get("configs" if key == "base_config" else key) and flag in text:
                return (
                    f"{entry.name} (a single {entry.family} file) cannot be loaded: this server was started "
                    f"without {flag} {metavar} (a server flag); {text}"
                )
        return f"{entry.name} (a single {entry.family} file) cannot be loaded: {text}"

    def submit(self, spec) -> Job:
        """Check and queue a job (its checked copy: `spec` is not changed); raises QueueFull when `max_queue` jobs
        are already waiting."""
        job = Job(self.check(spec))
        with self._lock:
            if self._closed:
                raise ServiceClosed("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self._retry_after())
            self._queue.append(job)
            self._jobs[job.id] = job
            self._forget_old()
            self._lock.notify_all()
        return job

    def run(self, spec, timeout: float | None = None):
        """Submit and wait: the job's result, or its error raised (JobCancelled if cancelled)."""
        job = self.submit(spec)
        if not job.wait(timeout):
            self.cancel(job.id)
            raise TimeoutError(f"job {job.id} did not finish within {timeout} s")
        if job.state == DONE:
            return job.result
        raise job.error if job.error is not None else JobCancelled(job.id)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once, or a running one at its next sampler step; None if unknown."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.done:
                return job
            job._cancel.set()
            if job.state == QUEUED:
                self._queue.remove(job)
                job._update(state=CANCELLED, error=JobCancelled(job.id), finished=time.time())
        return job

    def current(self) -> Job | None:
        """The running job (for progress polling)."""
        return self._running

    def interrupt(self) -> Job | None:
        """Cancel the running job, if any."""
        job = self._running
        return self.cancel(job.id) if job is not None else None

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._queue) + (1 if self._running is not None else 0)

    def set_base(self, name: str) -> str:
        """Make `name` the base of jobs that name none (the web UI's checkpoint switch); returns its name."""
        entry = self.registry.base(name)
        self.check_base(entry, "sd_model_checkpoint")
        self.current_base = entry.name
        return self.current_base

    def close(self, cancel_running: bool = True, timeout: float | None = 30.0) -> None:
        """Take no new jobs, cancel the queued ones, cancel (or let finish) the running one, stop the worker."""
        self.stop_accepting(cancel_running)
        self._worker.join(timeout)

    def stop_accepting(self, cancel_running: bool = True) -> None:
        """The first half of `close`, without waiting (safe from a signal handler's thread)."""
        with self._lock:
            self._closed = True
            for job in list(self._queue):
                job._cancel.set()
                job._update(state=CANCELLED, error=JobCancelled(job.id), finished=time.time())
            self._queue.clear()
            if cancel_running and self._running is not None:
                self._running._cancel.set()
            self._lock.notify_all()

    # ---------------------------------------------------------------------------------------------------
    # the worker
    def _retry_after(self) -> int:
        per_job = sum(self._durations) / len(self._durations) if self._durations else SECONDS_PER_QUEUED_JOB
        return max(1, round(per_job * (len(self._queue) + 1)))

    def _forget_old(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.done]
        for key in finished[: max(0, len(finished) - MAX_KEPT_JOBS)]:
            del self._jobs[key]

    def _work(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return  # closed and drained
                job = self._queue.popleft()
                self._running = job
            job._update(state=RUNNING, started=time.time())
            try:
                result = self._execute(job)
            except JobCancelled as err:
                job._update(state=CANCELLED, error=err, finished=time.time(), **self.public_error(err))
            except Exception as err:  # noqa: BLE001 - the job fails, the worker and the queue live on
                public = self.public_error(err)
                if public["error_type"] == INTERNAL:
                    logger.exception("job %s failed", job.id)
                job._update(state=FAILED, error=err, finished=time.time(), **public)
            else:
                job._update(state=DONE, result=result, step=job.total, finished=time.time())
                self._durations.append(job.finished - job.started)
            finally:
                with self._lock:
                    self._running = None
                    self._forget_old()

    def public_error(self, err: BaseException) -> dict:
        """`error_type` and `error_text` of a failed job: the error's own line for a client's mistake or a model
        that has gone (the models folders' paths cut to the names clients know), nothing of the server's internals
        for anything else (the log has it)."""
        if isinstance(err, JobCancelled):
            return {"error_type": CANCELLED_ERROR, "error_text": "cancelled"}
        if isinstance(err, ModelGone):
            return {"error_type": MODEL_GONE, "error_text": str(err)}
        if isinstance(err, ValueError):
            text = str(err).splitlines()[0] if str(err) else "invalid value"
            for root in self.registry.roots:
                text = text.replace(f"{root}/", "").replace(str(root), "the models folder")
            return {"error_type": INVALID, "error_text": text}
        return {"error_type": INTERNAL, "error_text": "internal error (a bug: the server's log has the details)"}

    def _execute(self, job: Job):
        if job.cancel_requested:
            raise JobCancelled(job.id)
        spec = job.spec
        if isinstance(spec, AnnotationJob):
            return annotate_image(spec.image, spec.annotator, spec.options)

        def progress(step: int, total: int) -> None:
            job._update(step=step, total=total)
            if job.cancel_requested:
                raise JobCancelled(job.id)

        try:
            pipe = self.pipeline(spec.base, [u.model for u in spec.units])
        except FileNotFoundError:  # a file went away between the check and the load: name the model, not the path
            for name, kind in [(spec.base, "base")] + [(u.model, "controlnet") for u in spec.units]:
                entry = self.registry.base(name) if kind == "base" else self.registry.controlnet(name)
                if not entry.present():
                    raise ModelGone(name, kind) from None
            raise
        if job.cancel_requested:  # cancelled while its models loaded: do not start sampling
            raise JobCancelled(job.id)
        import torch

        with torch.inference_mode():
            return run_job(pipe, spec, progress=progress)

    # ---------------------------------------------------------------------------------------------------
    # models, loaded once (worker thread only)
    def pipeline(self, base_name: str, controlnet_names: list[str]):
        """A pipeline of the base and ControlNets (registry names), reusing loaded modules."""
        from controlnet.generate.pipeline import ControlNetPipeline

        base = self._base(base_name)
        nets = [self._controlnet(base_name, base, name, set(controlnet_names)) for name in controlnet_names]
        return ControlNetPipeline.from_components(base, nets)

    def _base(self, name: str):
        if name in self._bases:
            self._bases.move_to_end(name)
            return self._bases[name]
        from controlnet.generate.base import load_base
        from controlnet.generate.builtin_format import BUILTIN_BASES

        entry = self.registry.base(name)
        spec = entry.name if entry.name in BUILTIN_BASES else entry.path
        options = self._load_options(entry)
        if self._is_transformer_file(entry):
            spec, refusal = self._file_base(entry)  # the checked source: its parts, configs and tokenizers
            if refusal is not None:
                raise ValueError(refusal)
            options = {"flags": options["flags"]} if "flags" in options else {}
        while len(self._bases) >= MAX_BASES:
            evicted, _ = self._bases.popitem(last=False)
            self._nets = OrderedDict((k, v) for k, v in self._nets.items() if k[0] != evicted)
        logger.info("loading base %s", entry.name)
        base = load_base(spec, device=self.device, dtype=self.dtype, **options)
        base.name = entry.name  # the registry's name: settings and responses never carry a path
        self._bases[name] = base
        layers = min(m.config.num_hidden_layers for m in base.text_modules())
        # output sides: multiples of the VAE factor (a transformer base: times its patch / 2x2 packing)
        self._facts[name] = (getattr(base, "size_multiple", base.vae_scale_factor), layers)
        return base

    def _controlnet(self, base_name: str, base, name: str, needed: set[str]):
        key = (base_name, name)
        if key in self._nets:
            self._nets.move_to_end(key)
            return self._nets[key][0]
        from controlnet.io.api import load_controlnet

        entry = self.registry.controlnet(name)
        dtype = self.dtype
        if dtype is None and hasattr(base, "transformer"):  # as `controlnet generate`: in the base's dtype
            dtype = base.transformer.dtype
        net = load_controlnet(entry.path, unet=base.unet, dtype=dtype)
        net = net.to(self.device).eval().requires_grad_(False)
        size = sum(p.numel() * p.element_size() for p in net.parameters())
        used = sum(s for _, s in self._nets.values())
        for old in list(self._nets):
            if used + size <= self.max_controlnet_bytes:
                break
            if old[1] not in needed or old[0] != base_name:
                used -= self._nets.pop(old)[1]
        self._nets[key] = (net, size)
        return net

    def loaded(self) -> dict:
        """What is in memory now (names and MiB), for health."""
        return {
            "bases": list(self._bases),
            "controlnets": [k[1] for k in self._nets],
            "controlnet_mb": round(sum(s for _, s in self._nets.values()) / 2**20, 1),
        }
