"""`run_job`: the one caller of the pipeline. Every front door (the CLI, a manifest line, the native `/v1` API,
the web-UI compatible API, the web page) describes a generation as a `GenerationJob` (generate/options.py) and
runs it here, so the same settings give the same pixels whichever door they came through
(docs/architecture.md#one-generation-one-description).

A unit is one ControlNet with its condition (paper Sec. 3.4: several nets add their residuals). `run_job`:
1. fills the unit images: none = the job's init image (as the web UI does in img2img), then runs each unit's
   annotator, if it names one, on its image (the condition map c_i is made from a photo);
2. chooses the output size (given, or the first condition's aspect at the base's native size, generate/sizes.py);
3. resizes each condition to that size by the unit's own resize mode: this is the only place conditions are
   resized on a job's path (the pipeline receives them at the output size and turns them into tensors);
4. calls the pipeline with the options and the units' per-net settings (the base's sampling defaults fill what the
   job leaves as none), and records each unit's model, annotator and resize mode in the settings.

The pipeline must hold one ControlNet per unit, in the units' order (the caller resolves `unit.model` to a net:
the CLI by path, the server through its model registry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from PIL import Image

from controlnet.generate.control_images import resize_image, to_pil
from controlnet.generate.options import ControlUnit, GenerationJob
from controlnet.generate.pipeline import INPAINT, GenerationResult
from controlnet.model.union_controlnet import FLUX_UNION_MODES, UNION_TYPES, UnionControlNet, type_id

Progress = Callable[[int, int], None]  # (sampler steps done, total)

__all__ = ["ControlUnit", "GenerationJob", "Progress", "annotate_image", "job_conditions", "run_job"]


def annotate_image(image: Image.Image, name: str, options: dict | None = None) -> Image.Image:
    """A condition map from a photo by the annotator `name` (the same call as `controlnet generate --annotator`)."""
    from controlnet.annotate.registry import get_annotator

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return Image.fromarray(get_annotator(name, **(options or {}))(np.asarray(rgb)))


def job_conditions(job: GenerationJob) -> list:
    """Step 1: one condition per unit (an RGB PIL image, or INPAINT), annotated where the unit names an annotator;
    the job has passed `GenerationJob.check`."""
    conds = []
    for k, unit in enumerate(job.units):
        image = unit.image if unit.image is not None else job.options.image  # GenerationJob.check: not both None
        if isinstance(image, str) and image == INPAINT:
            conds.append(INPAINT)
            continue
        image = to_pil(image, f"units[{k}].image")
        if unit.annotator:
            image = annotate_image(image, unit.annotator, unit.annotator_options)
        conds.append(image if image.mode == "RGB" else image.convert("RGB"))
    return conds


def union_type_from_annotator(unit: ControlUnit, net) -> ControlUnit:
    """A union net's unit that names no type takes its annotator's, where that names one (canny, depth, openpose,
    ...): the web UIs send the preprocessor and often no type. Any other unit is returned as it is."""
    if isinstance(net, UnionControlNet):
        count, table = net.union_config.num_control_type, UNION_TYPES
    else:  # a Flux union net (diffusers' FluxControlNetModel with num_mode), or a plain net (none)
        count, table = dict(getattr(net, "config", None) or {}).get("num_mode"), FLUX_UNION_MODES
    if unit.control_type is not None or not unit.annotator or count is None:
        return unit
    try:
        type_id(unit.annotator, count, table)
    except ValueError:
        return unit  # the pipeline asks for the type in one line
    return replace(unit, control_type=unit.annotator)


def run_job(pipe, job: GenerationJob, progress: Progress | None = None, on_size=None) -> GenerationResult:
    """Run `job` on `pipe` (which holds one ControlNet per unit, in order); see the module docstring.

    `on_size(size)` is called with the chosen `OutputSize` before sampling (the CLI prints its note): the size comes
    from the conditions as annotated, so only this function can tell it.
    """
    if len(pipe.controlnets) != len(job.units):
        raise ValueError(f"units: {len(job.units)} units for a pipeline with {len(pipe.controlnets)} ControlNets")
    job.check()
    conds = job_conditions(job)
    options = job.options
    size = pipe.output_size(options.width, options.height, conds, options.image)
    if on_size is not None:
        on_size(size)
    conds = [
        c if isinstance(c, str) else resize_image(c, size.width, size.height, u.resize_mode)
        for c, u in zip(conds, job.units, strict=True)
    ]
    units = [union_type_from_annotator(u, net) for u, net in zip(job.units, pipe.controlnets, strict=True)]
    options = replace(options.with_units(units), width=size.width, height=size.height)
    result = pipe(job.prompt, conds, options=options, progress=progress)
    result.settings["base"] = job.base
    for unit, settings in zip(job.units, result.settings["controlnets"], strict=True):
        settings.update(module=unit.annotator, model=unit.model, resize_mode=unit.resize_mode)
    return result
