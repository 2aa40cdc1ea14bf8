"""Score generated images per task and report them beside a floor and a ceiling, like the paper's Table 2.

- model:   the ControlNet's images for the held-out conditions and prompts;
- floor:   the uncontrolled base model's images for the same prompts (what the prompt alone achieves);
- ceiling: the ground-truth images through the same metric (what a perfect generator would score;
           the paper reports 0.58 re-segmentation IoU for ADE20K ground truth against 0.35 for ControlNet).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from controlnet.evaluate.edges import canny_f1, lines_f1, scribble_f1
from controlnet.evaluate.fill import fill_colour_accuracy, fill_colour_error, fill_iou
from controlnet.evaluate.pose import pose_overlap
from controlnet.evaluate.regions import depth_layer_miou, depth_silhouette_iou, normal_silhouette_iou, seg_miou


@dataclass(frozen=True)
class Metric:
    """One fidelity metric: `fn(generated, condition)` or, with `needs_prompt`, `fn(generated, condition, prompt)`."""

    name: str
    fn: Callable[..., float]
    higher_is_better: bool = True
    needs_prompt: bool = False


TASK_METRICS: dict[str, tuple[Metric, ...]] = {
    "fill": (
        Metric("disk IoU", fill_iou),
        Metric("colour accuracy", fill_colour_accuracy, needs_prompt=True),
        Metric("colour error", fill_colour_error, higher_is_better=False, needs_prompt=True),
    ),
    "shapes": (  # outlines of any shape and line width: the same placement and colour metrics
        Metric("shape IoU", fill_iou),
        Metric("colour accuracy", fill_colour_accuracy, needs_prompt=True),
        Metric("colour error", fill_colour_error, higher_is_better=False, needs_prompt=True),
    ),
    "canny": (Metric("edge F1", canny_f1),),
    "lines": (Metric("line F1", lines_f1),),
    "scribble": (Metric("scribble F1", scribble_f1),),
    "pose": (Metric("stick-figure F1", pose_overlap),),
    "seg": (Metric("cluster mIoU", seg_miou),),
    "depth": (Metric("silhouette IoU", depth_silhouette_iou), Metric("layer mIoU", depth_layer_miou)),
    "normal": (Metric("silhouette IoU", normal_silhouette_iou),),
}


def metric_by_name(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """The fidelity metric `fn(generated, condition)` called `name`: "fill_iou", "edge_f1", or "task:NAME", the
    first metric of world task NAME (e.g. task:canny -> edge F1, task:pose -> stick-figure F1)."""
    if name.startswith("task:"):
        task = name.split(":", 1)[1]
        if task not in TASK_METRICS:
            raise ValueError(f"metric={name!r}: no world task {task!r} (tasks: {', '.join(TASK_METRICS)})")
        return TASK_METRICS[task][0].fn
    named = {"fill_iou": fill_iou, "edge_f1": canny_f1}
    if name not in named:
        raise ValueError(f"metric={name!r}: expected fill_iou, edge_f1 or task:NAME")
    return named[name]


def score_by_name(name: str, images: Sequence[np.ndarray], conditions: Sequence[np.ndarray]) -> list[float]:
    """Per-image fidelity of generated `images` (H, W, 3) uint8 against their `conditions` (H, W, 3) uint8."""
    fn = metric_by_name(name)
    return [fn(image, condition) for image, condition in zip(images, conditions, strict=True)]


@dataclass(frozen=True)
class Row:
    """One metric's mean over the evaluation set for the model, the floor and the ceiling."""

    metric: str
    model: float
    floor: float
    ceiling: float
    higher_is_better: bool = True

    @property
    def gap_closed(self) -> float:
        """(model - floor) / (ceiling - floor): 0 = no better than no control, 1 = as good as ground truth."""
        span = self.ceiling - self.floor
        return float("nan") if abs(span) < 1e-9 else (self.model - self.floor) / span


@dataclass(frozen=True)
class Report:
    task: str
    n: int
    rows: tuple[Row, ...]

    def table(self) -> str:
        return format_table([self])


def _check_task(task: str) -> tuple[Metric, ...]:
    if task not in TASK_METRICS:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASK_METRICS)}")
    return TASK_METRICS[task]


def score_images(
    task: str,
    images: Sequence[np.ndarray],
    conditions: Sequence[np.ndarray],
    prompts: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Per-sample scores {metric name: (N,) float64} of `images[i]` against `conditions[i]`."""
    metrics = _check_task(task)
    if len(images) != len(conditions):
        raise ValueError(f"images: got {len(images)} for {len(conditions)} conditions; expected one per condition")
    if any(m.needs_prompt for m in metrics) and (prompts is None or len(prompts) != len(conditions)):
        got = "none" if prompts is None else len(prompts)
        raise ValueError(f"prompts: got {got} for {len(conditions)} conditions; task {task!r} needs one each")
    scores = {}
    for metric in metrics:
        values = [
            metric.fn(image, condition, prompts[i]) if metric.needs_prompt else metric.fn(image, condition)
            for i, (image, condition) in enumerate(zip(images, conditions, strict=True))
        ]
        scores[metric.name] = np.asarray(values, np.float64)
    return scores


def evaluate_images(
    task: str,
    generated: Sequence[np.ndarray],
    conditions: Sequence[np.ndarray],
    ground_truth: Sequence[np.ndarray],
    floor_images: Sequence[np.ndarray],
    prompts: Sequence[str] | None = None,
) -> Report:
    """Mean fidelity of `generated` (the model), `floor_images` (base model, same prompts, no control) and
    `ground_truth` (the ceiling) against the same `conditions`; all lists of (H, W, 3) uint8 RGB images."""
    if not len(conditions):
        raise ValueError("conditions: got an empty list; expected at least one evaluation sample")
    model = score_images(task, generated, conditions, prompts)
    floor = score_images(task, floor_images, conditions, prompts)
    ceiling = score_images(task, ground_truth, conditions, prompts)
    rows = tuple(
        Row(
            m.name,
            float(model[m.name].mean()),
            float(floor[m.name].mean()),
            float(ceiling[m.name].mean()),
            m.higher_is_better,
        )
        for m in TASK_METRICS[task]
    )
    return Report(task=task, n=len(conditions), rows=rows)


def format_table(reports: Sequence[Report]) -> str:
    """A plain-text table: task, metric, floor, model, ceiling, and the fraction of the floor-ceiling gap closed."""
    header = ("task", "metric", "n", "floor", "model", "ceiling", "gap closed")
    lines = [header]
    for report in reports:
        for row in report.rows:
            arrow = "" if row.higher_is_better else " (lower is better)"
            lines.append(
                (
                    report.task,
                    row.metric + arrow,
                    str(report.n),
                    f"{row.floor:.3f}",
                    f"{row.model:.3f}",
                    f"{row.ceiling:.3f}",
                    f"{row.gap_closed:.0%}" if np.isfinite(row.gap_closed) else "-",
                )
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [
            cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells))
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)
