"""The fill task: is the shape filled where the outline says, and in the colours the prompt names?

Placement and colour are scored apart: a 2-cluster segmentation of the output is compared with the region
the outline encloses (IoU), whatever the colours; colour is then checked on those regions against the
prompt's named colours. A base model that confuses colours cannot hide a ControlNet that places shapes well.
"""

from __future__ import annotations

import cv2
import numpy as np

from controlnet.evaluate.common import check_image, check_pair, iou, kmeans_labels
from controlnet.world.fill import COLOURS

OUTLINE_THRESHOLD = 127


def region_from_outline(condition: np.ndarray) -> np.ndarray:
    """(H, W) bool: the outline and everything it encloses (pixels not reachable from the border)."""
    outline = (check_image(condition, "condition").max(axis=2) > OUTLINE_THRESHOLD).astype(np.uint8)
    height, width = outline.shape
    canvas = np.zeros((height + 2, width + 2), np.uint8)  # a free border: the flood starts outside
    canvas[1:-1, 1:-1] = outline
    mask = np.zeros((height + 4, width + 4), np.uint8)
    cv2.floodFill(canvas, mask, (0, 0), 2, flags=4)
    return canvas[1:-1, 1:-1] != 2


def two_regions(generated: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(H, W) bool: the output's 2-colour-cluster split, oriented so True is the cluster that best covers `region`."""
    labels = kmeans_labels(generated.reshape(-1, 3).astype(np.float32), 2).reshape(region.shape) == 1
    return labels if iou(labels, region) >= iou(~labels, region) else ~labels


def fill_iou(generated: np.ndarray, condition: np.ndarray) -> float:
    """IoU between the outline's enclosed region and the matching colour cluster of the output (placement)."""
    check_pair(generated, condition)
    region = region_from_outline(condition)
    return iou(two_regions(generated, region), region)


def nearest_colour(rgb: np.ndarray) -> str:
    """Name of the named colour (world.fill.COLOURS) nearest to an RGB triple."""
    names = list(COLOURS)
    distances = np.linalg.norm(np.asarray([COLOURS[n] for n in names], np.float32) - rgb, axis=1)
    return names[int(distances.argmin())]


def prompt_colours(prompt: str) -> tuple[str, str]:
    """(shape colour, background colour) of a fill prompt "<colour> <shape> with <colour> background"."""
    words = prompt.split()
    if len(words) != 5 or words[2] != "with" or words[4] != "background":
        raise ValueError(f"prompt={prompt!r}: expected '<colour> <shape> with <colour> background'")
    return words[0], words[3]


def fill_colour_error(generated: np.ndarray, condition: np.ndarray, prompt: str) -> float:
    """Mean RGB distance / 255 between the named colours and the output's median colour inside / outside
    the outline's region (0 = exact; regions judged by the condition, so this is colour only)."""
    check_pair(generated, condition)
    shape_colour, background_colour = prompt_colours(prompt)
    region = region_from_outline(condition)
    errors = []
    for mask, name in ((region, shape_colour), (~region, background_colour)):
        if mask.any():
            median = np.median(generated[mask].astype(np.float32), axis=0)
            errors.append(float(np.linalg.norm(median - np.asarray(COLOURS[name], np.float32))) / 255.0)
    return float(np.mean(errors))


def fill_colour_accuracy(generated: np.ndarray, condition: np.ndarray, prompt: str) -> float:
    """1.0 if both the inside and outside median colours are nearest to the prompt's named colours, 0.5 if
    one is, else 0.0."""
    check_pair(generated, condition)
    shape_colour, background_colour = prompt_colours(prompt)
    region = region_from_outline(condition)
    hits = []
    for mask, name in ((region, shape_colour), (~region, background_colour)):
        median = np.median(generated[mask].astype(np.float32), axis=0) if mask.any() else np.zeros(3)
        hits.append(nearest_colour(median) == name)
    return float(np.mean(hits))
