"""Validation during training: generate for fixed held-out conditions, score fidelity, find the convergence step.

Paper Sec. 4 / Fig. 4 ("sudden convergence"): the model does not learn to follow the condition gradually; at some
step (usually < 10k for SD) it suddenly does. We measure it: at every validation the held-out conditions are
turned into images with the current ControlNet, each image is scored against its condition, and the
convergence step is the first validation step from which the mean fidelity stays at or above a threshold.

Metrics are the world's (controlnet.evaluate): `fill_iou` for the fill task (a 2-cluster colour segmentation of
the output vs the region the condition's outline encloses: placement apart from colour, so that a base that gets
colours wrong does not hide a good ControlNet, docs/architecture.md#the-built-in-prototype) and
`edge_f1` (Canny F1 with a pixel tolerance) for user data. Generating and scoring are evaluate's (`generate`,
`score` below are its functions), so `controlnet evaluate` measures without the trainer exactly as training does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from controlnet.evaluate.heldout import generate_images as generate
from controlnet.evaluate.report import score_by_name as score

# generate and score are evaluate's, named here as the trainer and the demo call them
__all__ = [
    "convergence_step",
    "generate",
    "generate_on_transformer",
    "grid",
    "metric_for",
    "score",
    "should_stop_early",
    "transformer_guidance",
]


def transformer_guidance(config, transformer_config: dict, arch: str) -> float | None:
    """The guidance value validation passes on an SD3 / Flux base.

    SD3: `validation.guidance_scale` (CFG, 1 = off). Flux's guidance_scale is no CFG but a value embedded in the
    transformer: a guidance-distilled base (dev, `guidance_embeds`) is validated at `flow.guidance`, the value it was
    trained with; a base without the embedding (schnell) takes none (its pipeline refuses one: None = the base's)."""
    if arch == "sd3":
        return config.validation.guidance_scale
    return config.flow.guidance if transformer_config.get("guidance_embeds") else None


def generate_on_transformer(
    pipeline,
    prompts: Sequence[str],
    conditions: Sequence[np.ndarray],
    steps: int,
    guidance_scale,
    seed: int,
    control_scale: float = 1.0,
) -> list[np.ndarray]:
    """`generate` on an SD3 / Flux base: one call per prompt and its condition (the transformer pipeline takes one
    condition image per net, not one per prompt), image k from seed + k as in `generate`'s one batched call. The
    floor (the base alone) is `control_scale=0`: the net's residuals are multiplied by 0, the locked transformer runs
    as it is. `guidance_scale` None: the base's default (`transformer_guidance`)."""
    images = []
    for k, (prompt, condition) in enumerate(zip(prompts, conditions, strict=True)):
        result = pipeline(
            [prompt],
            [condition],
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed + k,
            control_scale=control_scale,
            width=condition.shape[1],  # the condition's size (the training size), not the base's native one
            height=condition.shape[0],
            output_type="np",
        )
        images.append((result.array[0] * 255).round().astype(np.uint8))  # as `generate` (evaluate/heldout.py)
    return images


def metric_for(config) -> str:
    """The metric of `config.validation.metric`; "auto": the world task's (read from world.json), else edge F1."""
    metric = config.validation.metric
    if metric != "auto":
        return metric
    world = Path(config.data.path) / "world.json"
    if world.is_file():
        task = json.loads(world.read_text()).get("task")
        return "fill_iou" if task in ("fill", "shapes") else f"task:{task}"
    return "edge_f1"


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


def grid(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Tile equal-size (H, W, 3) images into one (rows * H, cols * W, 3) image."""
    return np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
