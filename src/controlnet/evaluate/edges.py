"""Edge-like conditions: Canny edges, straight lines (M-LSD / Hough), scribbles.

Each re-detects edges in the generated image and scores them against the condition with a tolerant F1.
"""

from __future__ import annotations

import cv2
import numpy as np

from controlnet.evaluate.common import check_pair, denoise, tolerance_px, tolerant_f1

CANNY_LOW, CANNY_HIGH = 100, 200  # the Canny annotator's defaults, as the condition was made
EDGE_TOLERANCE_AT_64 = 1.0  # px at 64 px
LINE_TOLERANCE_AT_64 = 1.0
SCRIBBLE_TOLERANCE_AT_64 = 2.0  # scribbles wobble ~2 px off the outline and are 2 px thick at 64 px
HOUGH_THRESHOLD_AT_64 = 8  # accumulator votes for a straight segment
HOUGH_MIN_LENGTH_FRACTION = 1 / 10  # of the image side
HOUGH_MAX_GAP_AT_64 = 2


def canny_edges(image: np.ndarray) -> np.ndarray:
    """(H, W) bool Canny edges of an RGB image (the annotator's thresholds) after a 3x3 median filter, so a
    generator's pixel noise does not read as edges."""
    return cv2.Canny(denoise(image), CANNY_LOW, CANNY_HIGH) > 0


def straight_segments(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: Canny edges explained by straight segments (probabilistic Hough), drawn 1 px wide."""
    size = image.shape[0]
    scale = max(1.0, size / 64.0)
    edges = cv2.Canny(denoise(image), CANNY_LOW, CANNY_HIGH)
    found = cv2.HoughLinesP(
        edges,
        rho=1,
        theta=np.pi / 180,
        threshold=int(HOUGH_THRESHOLD_AT_64 * scale),
        minLineLength=max(4, int(size * HOUGH_MIN_LENGTH_FRACTION)),
        maxLineGap=int(HOUGH_MAX_GAP_AT_64 * scale),
    )
    out = np.zeros(edges.shape, np.uint8)
    for x0, y0, x1, y1 in np.zeros((0, 4)) if found is None else found.reshape(-1, 4):
        cv2.line(out, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    return out > 0


def canny_f1(generated: np.ndarray, condition: np.ndarray) -> float:
    """Edge F1 between Canny(generated) and the condition's edges, 1 px tolerance at 64 px."""
    check_pair(generated, condition)
    tol = tolerance_px(generated.shape[0], EDGE_TOLERANCE_AT_64)
    return tolerant_f1(canny_edges(generated), condition.max(axis=2) > 127, tol)


def lines_f1(generated: np.ndarray, condition: np.ndarray) -> float:
    """Line F1 between straight segments re-detected in the generated image and the condition's lines."""
    check_pair(generated, condition)
    tol = tolerance_px(generated.shape[0], LINE_TOLERANCE_AT_64)
    return tolerant_f1(straight_segments(generated), condition.max(axis=2) > 127, tol)


def scribble_f1(generated: np.ndarray, condition: np.ndarray) -> float:
    """F1 between Canny(generated) and the scribble strokes, with the scribbles' wobble as tolerance."""
    check_pair(generated, condition)
    tol = tolerance_px(generated.shape[0], SCRIBBLE_TOLERANCE_AT_64)
    return tolerant_f1(canny_edges(generated), condition.max(axis=2) > 127, tol)
