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

A union net (train/union.py) is validated per condition type: each type's held-out set is the held-out samples that
hold it (`union_held_out`), generated for with that type alone (the net's call with one (condition, type) pair, as
`controlnet generate --control-type` makes it) and scored with that type's metric (`union_metrics`: auto on a world
union dataset is the world task of each type); its fidelity is the mean over the types.

A sharded net (`train.distributed=fsdp`) is validated by every process, each generating and scoring its share of the
held-out samples; the main one gathers the images and scores (train/sharded_validation.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from controlnet.evaluate.heldout import generate_images as generate
from controlnet.evaluate.report import score_by_name as score

# generate and score are evaluate's, named here as the trainer and the demo call them
__all__ = [
    "check_held_types",
    "convergence_step",
    "generate",
    "generate_on_transformer",
    "grid",
    "HeldOut",
    "metric_for",
    "pad_rows",
    "score",
    "should_stop_early",
    "transformer_guidance",
    "union_held_out",
    "union_metrics",
]

# how a `controlnet world make` folder was made (world/dataset.py): its task and a union dataset's types
WORLD_FILE = "world.json"


class HeldOut(NamedTuple):
    """One validation set: prompts, conditions and targets (S, S, 3) uint8, one each per held-out sample."""

    prompts: list[str]
    conditions: list[np.ndarray]
    targets: list[np.ndarray]


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
    world = Path(config.data.path) / WORLD_FILE
    if world.is_file():
        task = json.loads(world.read_text()).get("task")
        return "fill_iou" if task in ("fill", "shapes") else f"task:{task}"
    return "edge_f1"


def union_metrics(config, names: Sequence[str]) -> dict[str, str]:
    """The metric of each of a union net's types `names` (train/union.py): `validation.metric` for all of them where
    it names one; "auto": each type's world task metric (task:NAME), read from the world.json of a `controlnet world
    make --task union` folder (its union type names are the world's, but lines -> mlsd). One ValueError line naming
    validation.metric otherwise."""
    from controlnet.evaluate.report import metric_by_name

    v, root = config.validation, Path(config.data.path)
    setting = f"validation.every={v.every}, validation.metric={v.metric}"
    if v.metric != "auto":
        try:
            metric_by_name(v.metric)
        except ValueError as err:
            raise ValueError(f"{setting}: {err}") from None
        return dict.fromkeys(names, v.metric)
    from controlnet.world.dataset import UNION, UNION_TYPE_NAMES

    world = root / WORLD_FILE
    meta = json.loads(world.read_text()) if world.is_file() else {}
    tasks = {UNION_TYPE_NAMES.get(t, t): t for t in meta.get("types", [])} if meta.get("task") == UNION else {}
    unknown = [name for name in names if name not in tasks]
    if unknown:
        found = (
            f"its {WORLD_FILE} names the types {', '.join(tasks)}" if tasks else f"it has no union {WORLD_FILE}"
        )
        raise ValueError(
            f"{setting}: the union types' metrics come from a world union dataset, but data.path={str(root)!r} is not "
            f"one with a {unknown[0]!r} type ({found}); expected data from `controlnet world make --task union "
            "--types ...`, or one metric for every type: validation.metric fill_iou, edge_f1 or task:NAME"
        )
    return {name: f"task:{tasks[name]}" for name in names}


def check_held_types(held: Sequence[set[str]], names: Sequence[str], num_samples: int) -> None:
    """Every union type `names` is held by some held-out sample (`held`: the types of each); one ValueError line."""
    for name in names:
        if not any(name in types for types in held):
            raise ValueError(
                f"validation.num_samples={num_samples}: no held-out sample (the last {num_samples} of the data) "
                f"holds a {name!r} condition, so that type cannot be validated; raise validation.num_samples"
            )


def union_held_out(source, indices: Sequence[int], names: Sequence[str], size: int) -> dict[str, HeldOut]:
    """{type: its HeldOut} for a union net's types `names`: the held-out samples `indices` of the union `source`
    (data/sources.py UnionSource) that hold the type, with that type's condition, resized to size x size (as
    train/batches.py `held_out` does for one condition)."""
    from controlnet.data.sources import decode_image

    check_held_types([set(source.types(i)) for i in indices], names, len(indices))
    sets = {name: HeldOut([], [], []) for name in names}
    for i in indices:
        target_bytes, conditions = source.read(i)
        target = np.asarray(decode_image(target_bytes).resize((size, size)))
        for name, data in conditions.items():
            if name in sets:
                sets[name].prompts.append(source.prompt(i))
                sets[name].conditions.append(np.asarray(decode_image(data).resize((size, size))))
                sets[name].targets.append(target)
    return sets


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


def pad_rows(rows: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
    """Rows of equal-size (H, W, 3) images padded with black ones to the longest row's length, for `grid` (a union
    net's validation sets, one row per type, differ in size)."""
    width = max(len(row) for row in rows)
    return [list(row) + [np.zeros_like(row[0])] * (width - len(row)) for row in rows]


def grid(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Tile equal-size (H, W, 3) images into one (rows * H, cols * W, 3) image."""
    return np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
