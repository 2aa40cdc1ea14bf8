"""One generation as a typed job, and the one function that runs it: every front door builds a `GenerationJob`.

`controlnet generate`, the native `/v1` API, the web-UI compatible API and the web page all describe a
generation as a `GenerationJob` (prompt, base, ControlNet units, sampling) and call `run_job(pipe, job)`, so the
same settings give the same pixels whichever door they came through (the anchors' API and UI do not: issue 14).

A unit is one ControlNet with its condition (paper Sec. 3.4: several nets add their residuals). `run_job`:
1. fills the unit images: None = the job's init image (as the web UI does in img2img), then runs each unit's
   annotator, if it names one, on its image (the condition map c_i is made from a photo);
2. chooses the output size (given, or the first condition's aspect at the base's native size, generate/sizes.py);
3. resizes each condition to that size by the unit's own resize mode (the pipeline has one resize mode for all
   nets; a condition already at the output size passes through it unchanged);
4. calls the pipeline with per-net lists (scale, window, mode, block scales) and the base's sampling defaults
   for what the job leaves as None.

The pipeline must hold one ControlNet per unit, in the units' order (the caller resolves `unit.model` to a net:
the CLI by path, the server through its model registry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from controlnet.generate.control_images import resize_image, resize_mode, to_pil
from controlnet.generate.guidance import control_mode
from controlnet.generate.options import GenerationOptions
from controlnet.generate.pipeline import INPAINT, GenerationResult

Progress = Callable[[int, int], None]  # (sampler steps done, total)


@dataclass
class ControlUnit:
    """One ControlNet of a job and its condition."""

    model: str
    """ControlNet: a registry name (server: `builtin:canny`, `control_v11p_sd15_canny [d14c016b]`) or a path (CLI)."""
    image: Any = None
    """Condition image (PIL); None = the job's init image; "inpaint" = the v1.1 inpaint condition (image + mask)."""
    annotator: str | None = None
    """Turn `image` into a condition map first with this annotator (annotate/registry.py); None = use it as is."""
    annotator_options: dict = field(default_factory=dict)
    """The annotator's options (its dataclass fields, e.g. low_threshold for canny)."""
    scale: float = 1.0
    """Control strength: the net's residuals are multiplied by it (0 = the net is not run)."""
    start: float = 0.0
    """Fraction of the schedule where the net starts acting."""
    end: float = 1.0
    """Fraction of the schedule where the net stops acting."""
    mode: str = "balanced"
    """balanced | prompt | controlnet (guess mode) | cfg_resolution (generate/guidance.py)."""
    resize_mode: str = "just_resize"
    """How this unit's condition meets the output size: just_resize | crop_and_resize | resize_and_pad."""
    block_scales: list | None = None
    """Per-output scales (13 for SD1.5), or None."""

    def __post_init__(self):
        self.resize_mode = resize_mode(self.resize_mode)
        self.mode = control_mode(self.mode).name
        if self.annotator is not None and self.annotator.lower() == "none":
            self.annotator = None


@dataclass
class GenerationJob:
    """Everything one generation needs, with no file paths in it (images are decoded PIL images)."""

    prompt: str = ""
    negative_prompt: str | None = None
    base: str = "builtin"
    """The base model: its registry name (server) or the --base spec (CLI); the pipeline must already be it."""
    units: list[ControlUnit] = field(default_factory=list)
    seed: int = 0
    """Image k of the batch uses seed + k."""
    steps: int | None = None
    """Sampler steps; None = the base's SamplingDefaults."""
    guidance_scale: float | None = None
    """CFG scale; None = the base's SamplingDefaults."""
    scheduler: str | None = None
    """Sampler name (generate/samplers.py); None = the base's."""
    width: int | None = None
    """None: from the first condition (or the init image), scaled to the base's native size."""
    height: int | None = None
    batch_size: int = 1
    init_image: Any = None
    """img2img / inpainting source (PIL), or None for text-to-image."""
    mask: Any = None
    """Inpainting mask (PIL, white = repaint)."""
    strength: float | None = None
    """img2img: fraction of the schedule re-run; None = 0.75 (inpainting 1)."""
    eta: float = 0.0
    clip_skip: int = 0
    guess_mode_form: str = "reference"
    resize_mode: str = "just_resize"
    """How the init image and mask meet the output size (each unit's condition has its own)."""
    inpaint_paste: bool = False

    def __post_init__(self):
        self.resize_mode = resize_mode(self.resize_mode)


def with_base_defaults(options: dict, sampling) -> dict:
    """`options` with guidance, steps and sampler that are missing or None taken from the base's SamplingDefaults."""
    filled = {k: v for k, v in options.items() if not (k in ("guidance_scale", "steps") and v is None)}
    filled = {"guidance_scale": sampling.guidance_scale, "steps": sampling.steps, **filled}
    if filled.get("scheduler") is None and sampling.scheduler is not None:
        filled["scheduler"] = sampling.scheduler
    return filled


def annotate_image(image: Image.Image, name: str, options: dict | None = None) -> Image.Image:
    """A condition map from a photo by the annotator `name` (the same call as `controlnet generate --annotator`)."""
    from controlnet.annotate.registry import get_annotator

    return Image.fromarray(get_annotator(name, **(options or {}))(np.asarray(image.convert("RGB"))))


def job_conditions(job: GenerationJob) -> list:
    """Step 1: one condition per unit (PIL, or INPAINT), annotated where the unit names an annotator."""
    conds = []
    for k, unit in enumerate(job.units):
        image = unit.image if unit.image is not None else job.init_image
        if image is None:
            raise ValueError(f"units[{k}].image: no condition image and no init image to take it from")
        if isinstance(image, str) and image == INPAINT:
            conds.append(INPAINT)
            continue
        image = to_pil(image, f"units[{k}].image")
        if unit.annotator:
            image = annotate_image(image, unit.annotator, unit.annotator_options)
        conds.append(image)
    return conds


def job_options(job: GenerationJob, width: int, height: int) -> dict:
    """GenerationOptions fields of a job (per-net lists; sampling left None where the base decides)."""
    units = job.units
    return {
        "negative_prompt": job.negative_prompt,
        "guidance_scale": job.guidance_scale,
        "steps": job.steps,
        "seed": job.seed,
        "batch_size": job.batch_size,
        "width": width,
        "height": height,
        "resize_mode": job.resize_mode,
        "control_scale": [float(u.scale) for u in units],
        "control_start": [float(u.start) for u in units],
        "control_end": [float(u.end) for u in units],
        "control_mode": [u.mode for u in units],
        "block_scales": [u.block_scales for u in units] if any(u.block_scales for u in units) else None,
        "guess_mode_form": job.guess_mode_form,
        "image": job.init_image,
        "mask": job.mask,
        "strength": job.strength,
        "scheduler": job.scheduler,
        "eta": job.eta,
        "clip_skip": job.clip_skip,
        "inpaint_paste": job.inpaint_paste,
    }


def check_job(job: GenerationJob) -> None:
    """Checks that need no model (GenerationOptions' own), so a server refuses a bad job before queueing it."""
    options = job_options(job, job.width, job.height)
    options = {k: v for k, v in options.items() if v is not None or k in ("width", "height", "block_scales")}
    GenerationOptions(**options).per_net(len(job.units))


def run_job(pipe, job: GenerationJob, progress: Progress | None = None, on_size=None) -> GenerationResult:
    """Run `job` on `pipe` (which holds one ControlNet per unit, in order); see the module docstring.

    `on_size(size)` is called with the chosen `OutputSize` before sampling (the CLI prints its note): the size comes
    from the conditions as annotated, so only this function can tell it.
    """
    if len(pipe.controlnets) != len(job.units):
        raise ValueError(f"units: {len(job.units)} units for a pipeline with {len(pipe.controlnets)} ControlNets")
    conds = job_conditions(job)
    size = pipe.output_size(job.width, job.height, conds, job.init_image)
    if on_size is not None:
        on_size(size)
    conds = [
        c if isinstance(c, str) else resize_image(c.convert("RGB"), size.width, size.height, u.resize_mode)
        for c, u in zip(conds, job.units, strict=True)
    ]
    options = with_base_defaults(job_options(job, size.width, size.height), pipe.sampling)
    result = pipe(job.prompt, conds, progress=progress, **options)
    result.settings["base"] = job.base
    for unit, settings in zip(job.units, result.settings["controlnets"], strict=True):
        settings.update(module=unit.annotator, model=unit.model, resize_mode=unit.resize_mode)
    return result
