"""Scribbles from a photo: thick, simplified, binary strokes (paper Sec. 4, "user scribbles").

Follows the WebUI ControlNet extension's `scribble_xdog`: the difference of a fine (sigma 0.5) and a
coarse (sigma 5) Gaussian blur, darkest over the channels, thresholded at `threshold`. Then simplified as
hand-drawn scribbles are: connected blobs smaller than `min_area` pixels are dropped, and strokes are
thickened by a `stroke_width` x `stroke_width` dilation (the released scribble model was trained on
synthesized, heavily dilated boundaries).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from controlnet.annotate.base import Annotator
from controlnet.settings_cli import setting

XDOG_FINE_SIGMA = 0.5  # scribble_xdog: g1 = GaussianBlur(img, sigma=0.5)
XDOG_COARSE_SIGMA = 5.0  # scribble_xdog: g2 = GaussianBlur(img, sigma=5.0)
XDOG_THRESHOLD = 32  # scribble_xdog default thr_a, applied to 2 x (coarse - fine)
XDOG_GAIN = 2.0  # scribble_xdog compares 2 * (coarse - fine) with the threshold
DEFAULT_MIN_AREA = 16  # pixels at the detect resolution; smaller blobs are texture, not strokes
DEFAULT_STROKE_WIDTH = 3  # pixels at the detect resolution
MAX_STROKE_WIDTH = 64  # a dilation's cost grows with its side; wider strokes cover the map
BINARY_CUT = 128  # re-binarise after the resize back to the input size


@dataclass
class Scribble(Annotator):
    """Binary scribble map: (H, W, 3) uint8 with values in {0, 255}, white strokes on black."""

    threshold: float = setting(XDOG_THRESHOLD, ge=0, le=510)
    """XDoG threshold on 2 x (coarse blur - fine blur), 0..510; lower keeps fainter edges."""
    min_area: int = setting(DEFAULT_MIN_AREA, ge=0, le=2**31 - 1)
    """Connected stroke pieces with fewer pixels than this (before thickening) are removed."""
    stroke_width: int = setting(DEFAULT_STROKE_WIDTH, ge=1, le=MAX_STROKE_WIDTH)
    """Strokes are dilated by a square of this side (1 keeps the raw XDoG lines)."""

    name = "scribble"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.stroke_width, int) or isinstance(self.stroke_width, bool):
            raise ValueError(f"stroke_width: got {self.stroke_width!r}; expected an integer >= 1")

    def detect(self, image: np.ndarray) -> np.ndarray:
        pixels = image.astype(np.float32)  # (h, w, 3)
        fine = cv2.GaussianBlur(pixels, (0, 0), XDOG_FINE_SIGMA)
        coarse = cv2.GaussianBlur(pixels, (0, 0), XDOG_COARSE_SIGMA)
        darkness = np.min(coarse - fine, axis=2).clip(0, 255)  # (h, w): > 0 where a pixel is darker than around it
        strokes = (XDOG_GAIN * darkness > self.threshold).astype(np.uint8)  # (h, w) in {0, 1}
        if self.min_area > 0:
            count, labels, stats, _ = cv2.connectedComponentsWithStats(strokes, connectivity=8)
            keep = stats[:, cv2.CC_STAT_AREA] >= self.min_area  # (count,)
            keep[0] = False  # label 0 is the background
            strokes = keep[labels].astype(np.uint8)
        if self.stroke_width > 1:
            kernel = np.ones((self.stroke_width, self.stroke_width), np.uint8)
            strokes = cv2.dilate(strokes, kernel)
        return strokes * np.uint8(255)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        resized = super().__call__(image)  # linear resize back blurs the stroke borders
        return np.where(resized >= BINARY_CUT, 255, 0).astype(np.uint8)
