"""Validation during training: generate for fixed held-out conditions, score fidelity, find the convergence step.

Paper Sec. 4 / Fig. 4 ("sudden convergence"): the model does not learn to follow the condition gradually; at some
step (usually < 10k for SD) it suddenly does. We measure it: at every validation the held-out conditions are
turned into images with the current ControlNet, each image is scored against its condition, and the
convergence step is the first validation step from which the mean fidelity stays at or above a threshold.

Metrics: `fill_iou` for the fill task (the filled region of the generated image, found by a 2-cluster colour
segmentation seeded with the border colour, vs the disk enclosed by the condition's outline: it scores placement
apart from colour, DESIGN.md) and `edge_f1` for user data (Canny edges of the image vs the condition's edges,
with a 2-px tolerance).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

KMEANS_ITERATIONS = 10
EDGE_TOLERANCE_PX = 2
CANNY_LOW, CANNY_HIGH = 100, 200  # the paper's Canny thresholds for its edge model
OUTLINE_THRESHOLD = 128


def outline_to_mask(outline: np.ndarray) -> np.ndarray:
    """(H, W) bool: the region enclosed by a white-on-black outline (outline included), by flood fill."""
    line = (outline.max(axis=-1) if outline.ndim == 3 else outline) >= OUTLINE_THRESHOLD  # (H, W)
    padded = np.pad(line.astype(np.uint8), 1)  # a free border so the fill reaches around the shape
    fill = padded.copy()
    flood_mask = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(fill, flood_mask, (0, 0), 2)
    return (fill != 2)[1:-1, 1:-1]


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels of the cluster that is not the background, by 2-means in RGB seeded at the border."""
    pixels = image.reshape(-1, 3).astype(np.float32)  # (HW, 3)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    bg = np.median(border, axis=0)
    fg = pixels[((pixels - bg) ** 2).sum(-1).argmax()]
    for _ in range(KMEANS_ITERATIONS):
        is_fg = ((pixels - fg) ** 2).sum(-1) < ((pixels - bg) ** 2).sum(-1)
        if is_fg.all() or not is_fg.any():
            break
        fg, bg = pixels[is_fg].mean(0), pixels[~is_fg].mean(0)
    is_fg = ((pixels - fg) ** 2).sum(-1) < ((pixels - bg) ** 2).sum(-1)
    return is_fg.reshape(image.shape[:2])


def fill_iou(image: np.ndarray, outline: np.ndarray) -> float:
    """IoU of the generated image's filled region with the disk its condition outlines (fill task)."""
    truth = outline_to_mask(outline)
    if outline.shape[:2] != image.shape[:2]:
        truth = cv2.resize(truth.astype(np.uint8), image.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
    pred = foreground_mask(image)
    union = (truth | pred).sum()
    return float((truth & pred).sum() / union) if union else 1.0


def edge_f1(image: np.ndarray, condition: np.ndarray) -> float:
    """F1 of Canny edges of `image` against the condition's edges, each matched within EDGE_TOLERANCE_PX."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    pred = cv2.Canny(gray, CANNY_LOW, CANNY_HIGH) > 0
    cond = condition.max(axis=-1) if condition.ndim == 3 else condition
    if cond.shape != pred.shape:
        cond = cv2.resize(cond, pred.shape[::-1], interpolation=cv2.INTER_NEAREST)
    truth = cv2.Canny(cond, CANNY_LOW, CANNY_HIGH) > 0 if cond.max() > 0 else cond > 0
    kernel = np.ones((2 * EDGE_TOLERANCE_PX + 1,) * 2, np.uint8)
    if not pred.any() and not truth.any():
        return 1.0
    precision = (pred & (cv2.dilate(truth.astype(np.uint8), kernel) > 0)).sum() / max(pred.sum(), 1)
    recall = (truth & (cv2.dilate(pred.astype(np.uint8), kernel) > 0)).sum() / max(truth.sum(), 1)
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


METRIC_FUNCTIONS = {"fill_iou": fill_iou, "edge_f1": edge_f1}


def score(metric: str, images: Sequence[np.ndarray], conditions: Sequence[np.ndarray]) -> list[float]:
    """Per-image fidelity of generated `images` (H, W, 3) uint8 against their `conditions` (H, W, 3) uint8."""
    fn = METRIC_FUNCTIONS[metric]
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
    """(H, W, 3) uint8 images for prompts + conditions with the pipeline's ControlNet, image k from seed + k."""
    images = []
    for k, (prompt, cond) in enumerate(zip(prompts, conditions, strict=True)):
        control = [cond] if pipeline.controlnets else []
        result = pipeline(
            prompt,
            control,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed + k,
            control_scale=control_scale,
            output_type="np",
        )
        images.append((result.array[0] * 255).round().astype(np.uint8))
    return images


def grid(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Tile equal-size (H, W, 3) images into one (rows * H, cols * W, 3) image."""
    return np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
