"""Validation during training: generate for fixed held-out conditions, score fidelity, find the convergence step.

Paper Sec. 4 / Fig. 4 ("sudden convergence"): the model does not learn to follow the condition gradually; at some
step (usually < 10k for SD) it suddenly does. We measure it: at every validation the held-out conditions are
turned into images with the current ControlNet, each image is scored against its condition, and the
convergence step is the first validation step from which the mean fidelity stays at or above a threshold.

Metrics are the world's (controlnet.evaluate): `fill_iou` for the fill task (a 2-cluster colour segmentation of
the output vs the region the condition's outline encloses: placement apart from colour, DESIGN.md) and
`edge_f1` (Canny F1 with a pixel tolerance) for user data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _metric(name: str):
    """The world's fidelity metric `name` (controlnet.evaluate), imported on use.

    "task:NAME" is the first metric of world task NAME (e.g. task:canny -> edge F1, task:pose -> stick-figure F1).
    """
    if name.startswith("task:"):
        from controlnet.evaluate.report import TASK_METRICS

        task = name.split(":", 1)[1]
        if task not in TASK_METRICS:
            raise ValueError(
                f"validation.metric={name!r}: no world task {task!r} (tasks: {', '.join(TASK_METRICS)})"
            )
        return TASK_METRICS[task][0].fn
    if name == "fill_iou":
        from controlnet.evaluate.fill import fill_iou

        return fill_iou
    if name == "edge_f1":
        from controlnet.evaluate.edges import canny_f1

        return canny_f1
    raise ValueError(f"validation.metric={name!r}: expected fill_iou or edge_f1")


def metric_for(config) -> str:
    """The metric of `config.validation.metric`; "auto": the world task's (read from world.json), else edge F1."""
    metric = config.validation.metric
    if metric != "auto":
        return metric
    world = Path(config.data.path) / "world.json"
    if world.is_file():
        task = json.loads(world.read_text()).get("task")
        return "fill_iou" if task == "fill" else f"task:{task}"
    return "edge_f1"


def score(metric: str, images: Sequence[np.ndarray], conditions: Sequence[np.ndarray]) -> list[float]:
    """Per-image fidelity of generated `images` (H, W, 3) uint8 against their `conditions` (H, W, 3) uint8."""
    fn = _metric(metric)
    return [fn(img, cond) for img, cond in zip(images, conditions, strict=True)]


def convergence_step(history: Sequence[tuple[int, float]], threshold: float) -> int | None:
    """First step from which every later fidelity is >= threshold (paper Sec. 4 'sudden convergence')."""
    found = None
    for step, value in history:
        if value >= threshold:
            if found is None:
                found = step
        else:
            found = None
    return found


def should_stop_early(history: Sequence[tuple[int, float]], threshold: float, patience: int) -> bool:
    """True when the last `patience` validations were all at or above the threshold."""
    return len(history) >= patience and all(v >= threshold for _, v in history[-patience:])


def generate(pipeline, prompts: Sequence[str], conditions: Sequence[np.ndarray], steps: int,
             guidance_scale: float, seed: int, control_scale: float = 1.0) -> list[np.ndarray]:  # fmt: skip
    """(H, W, 3) uint8 images for prompts + conditions with the pipeline's ControlNet, image k from seed + k.

    One batched pipeline call (the pipeline draws image k's noise from its own generator seeded seed + k, so the
    images do not depend on the batch they were generated in).
    """
    control = [list(conditions)] if pipeline.controlnets else []
    result = pipeline(
        list(prompts),
        control,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        control_scale=control_scale,
        output_type="np",
    )
    return [(image * 255).round().astype(np.uint8) for image in result.array]


def grid(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Tile equal-size (H, W, 3) images into one (rows * H, cols * W, 3) image."""
    return np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
