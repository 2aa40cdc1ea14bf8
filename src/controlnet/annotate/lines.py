"""Straight line segments drawn like the M-LSD maps of the released "mlsd" ControlNet (paper Sec. 4, Hough lines).

The reference detects segments with the learned M-LSD network and draws each one as a 1-pixel white line
on black. Here segments come from a classical detector, no weights: OpenCV's LSD (Grompone von Gioi et
al., line segment detector) or the probabilistic Hough transform on Canny edges; segments shorter than
`min_length` pixels (M-LSD's own default length threshold, 20 px) are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from controlnet.annotate.base import MAX_DETECT_RESOLUTION, Annotator
from controlnet.settings_cli import setting

MLSD_MIN_LENGTH = 20.0  # M-LSD `pred_lines(..., dist_thr=20.0)`: shortest segment kept, in pixels
MLSD_LINE_WIDTH = 1  # the reference draws `cv2.line(..., [255, 255, 255], 1)`
LINE_VALUE = 255
METHODS = ("lsd", "hough")
HOUGH_CANNY_LOW, HOUGH_CANNY_HIGH = 50, 150  # edges fed to the Hough transform
HOUGH_RHO = 1.0  # distance resolution (px)
HOUGH_THETA = np.pi / 180  # angle resolution: 1 degree
HOUGH_VOTES = 40  # accumulator votes a segment needs
HOUGH_MAX_GAP = 4  # largest gap (px) bridged inside a segment


@dataclass
class Lines(Annotator):
    """Map of straight segments: (H, W, 3) uint8, 255 on 1-px lines, 0 elsewhere."""

    min_length: float = setting(MLSD_MIN_LENGTH, ge=0, le=MAX_DETECT_RESOLUTION * 2)
    """Shortest segment kept, in pixels at the detect resolution."""
    method: str = "lsd"
    """Segment detector: "lsd" (OpenCV line segment detector) or "hough" (probabilistic Hough on Canny edges)."""

    name = "lines"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method: got {self.method!r}; expected one of {', '.join(METHODS)}")

    def segments(self, image: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8 -> (N, 4) float32 segments (x0, y0, x1, y1) at least `min_length` long."""
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)  # (h, w)
        if self.method == "lsd":
            found = cv2.createLineSegmentDetector(cv2.LSD_REFINE_STD).detect(gray)[0]
        else:
            edges = cv2.Canny(gray, HOUGH_CANNY_LOW, HOUGH_CANNY_HIGH)
            found = cv2.HoughLinesP(
                edges, HOUGH_RHO, HOUGH_THETA, HOUGH_VOTES, minLineLength=self.min_length, maxLineGap=HOUGH_MAX_GAP
            )
        if found is None:
            return np.zeros((0, 4), np.float32)
        segments = found.reshape(-1, 4).astype(np.float32)  # (N, 4)
        lengths = np.hypot(segments[:, 2] - segments[:, 0], segments[:, 3] - segments[:, 1])  # (N,)
        return segments[lengths >= self.min_length]

    def detect(self, image: np.ndarray) -> np.ndarray:
        canvas = np.zeros(image.shape[:2], np.uint8)  # (h, w)
        for x0, y0, x1, y1 in self.segments(image):
            # int() truncation as the reference does before drawing.
            cv2.line(canvas, (int(x0), int(y0)), (int(x1), int(y1)), LINE_VALUE, MLSD_LINE_WIDTH)
        return canvas
