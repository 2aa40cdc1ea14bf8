"""Canny edges, the condition of the paper's first ControlNet (Sec. 4, "Canny Edge").

Same operations as the reference `CannyDetector`: `cv2.Canny` on the RGB image at the detect resolution
(OpenCV takes the strongest gradient over the three channels), white edges on black, resized back with
linear interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from controlnet.annotate.base import Annotator
from controlnet.settings_cli import setting

DEFAULT_LOW_THRESHOLD = 100  # reference gradio_canny2image / controlnet_aux defaults
DEFAULT_HIGH_THRESHOLD = 200
MAX_GRADIENT = 2040  # OpenCV's L1 Sobel magnitude of an 8-bit image stays below this: no edge lies above it


@dataclass
class Canny(Annotator):
    """Canny edge map: (H, W, 3) uint8, 255 on edges."""

    low_threshold: int = setting(DEFAULT_LOW_THRESHOLD, ge=0, le=MAX_GRADIENT)
    """Hysteresis low threshold on the gradient magnitude."""
    high_threshold: int = setting(DEFAULT_HIGH_THRESHOLD, ge=0, le=MAX_GRADIENT)
    """Hysteresis high threshold; must be >= low_threshold."""

    name = "canny"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.high_threshold < self.low_threshold:
            raise ValueError(
                f"high_threshold: got {self.high_threshold}; expected >= low_threshold ({self.low_threshold})"
            )

    def detect(self, image: np.ndarray) -> np.ndarray:
        return cv2.Canny(image, self.low_threshold, self.high_threshold)  # (h, w)
