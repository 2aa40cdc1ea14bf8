"""Annotators by name: `get_annotator("canny", low_threshold=50)(image)`.

This is also the entry point the generation pipeline uses (`annotate(image, "depth", weights=...)`).
Modules are imported on first use so that listing names stays cheap (no torch import).
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from importlib import import_module
from typing import Any

import numpy as np

# name -> "module:Class"; classical annotators first, then the ones that need local weights.
ANNOTATORS: dict[str, str] = {
    "canny": "controlnet.annotate.canny:Canny",
    "lines": "controlnet.annotate.lines:Lines",
    "scribble": "controlnet.annotate.scribble:Scribble",
    "softedge": "controlnet.annotate.softedge:SoftEdge",
    "lineart_standard": "controlnet.annotate.lineart:LineartStandard",
    "normal": "controlnet.annotate.normal:NormalFromDepth",
    "shuffle": "controlnet.annotate.shuffle:Shuffle",
    "tile": "controlnet.annotate.tile:Tile",
    "inpaint": "controlnet.annotate.inpaint:InpaintMask",
    "invert": "controlnet.annotate.invert:Invert",
    "openpose_json": "controlnet.annotate.keypoints:PoseKeypoints",
    "depth": "controlnet.annotate.depth:Depth",
    "seg": "controlnet.annotate.segmentation:Segmentation",
    "hed": "controlnet.annotate.hed:Hed",
    "pidinet": "controlnet.annotate.pidinet:PiDiNetEdges",
    "openpose": "controlnet.annotate.openpose:OpenPose",
}


def list_annotators() -> list[str]:
    """Names accepted by `get_annotator`, in a stable order."""
    return list(ANNOTATORS)


def annotator_class(name: str) -> type:
    """The class behind `name` (its dataclass fields are the options)."""
    if name not in ANNOTATORS:
        raise ValueError(f"annotator: unknown name {name!r}; expected one of {', '.join(ANNOTATORS)}")
    module_name, class_name = ANNOTATORS[name].split(":")
    return getattr(import_module(module_name), class_name)


def annotator_options(name: str) -> dict[str, dataclasses.Field]:
    """Option name -> dataclass field for the annotator `name`."""
    return {field.name: field for field in dataclasses.fields(annotator_class(name)) if field.init}


def get_annotator(name: str, **options: Any):
    """Build the annotator `name` with `options`; unknown options are a ValueError listing the valid ones."""
    cls = annotator_class(name)
    valid = annotator_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"{name}: unknown option(s) {', '.join(unknown)}; expected some of {', '.join(valid) or '(none)'}"
        )
    return cls(**options)


MAX_CACHED_ANNOTATORS = 8  # learned annotators hold networks; keep a few, not all


@lru_cache(maxsize=MAX_CACHED_ANNOTATORS)
def _cached(name: str, options: tuple[tuple[str, Any], ...]):
    return get_annotator(name, **dict(options))


def cached_annotator(name: str, **options: Any):
    """`get_annotator`, built once per (name, options) and reused: learned weights are read only once."""
    try:
        return _cached(name, tuple(sorted(options.items())))
    except TypeError:  # an unhashable option value (a list...): build a fresh one
        return get_annotator(name, **options)


def annotate(image: np.ndarray, name: str, **options: Any) -> np.ndarray:
    """One call for the pipeline: (H, W, C) image -> (H, W, 3) uint8 condition map from annotator `name`.

    The annotator is cached per (name, options), so calling this per image reads weights once.
    """
    return cached_annotator(name, **options)(image)
