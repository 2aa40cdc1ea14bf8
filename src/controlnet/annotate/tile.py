"""Tile condition (ControlNet 1.1 "tile"): the image with its fine detail removed.

As the WebUI extension's `tile_resample`, the image is shrunk by `down_sampling_rate` (area
interpolation); it is then brought back to the input size (cubic) so the map aligns with the image, and
optionally blurred. The tile ControlNet re-invents the detail that this map lacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from controlnet.annotate.base import MAX_DETECT_RESOLUTION, MAX_SIGMA, Annotator
from controlnet.settings_cli import setting

DEFAULT_DOWN_SAMPLING_RATE = 4.0  # 512 px -> 128 px of real detail, a typical tile-upscaling condition


@dataclass
class Tile(Annotator):
    """Low-detail image: (H, W, 3) uint8 at the input size."""

    detect_resolution: int | None = None
    down_sampling_rate: float = setting(DEFAULT_DOWN_SAMPLING_RATE, ge=1, le=MAX_DETECT_RESOLUTION)
    """Shrink factor (>= 1); 1 keeps the image."""
    blur_sigma: float = setting(0.0, ge=0, le=MAX_SIGMA)
    """Extra Gaussian blur in pixels of the output; 0 disables it."""

    name = "tile"

    def detect(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        small_size = (max(1, int(width / self.down_sampling_rate)), max(1, int(height / self.down_sampling_rate)))
        small = cv2.resize(image, small_size, interpolation=cv2.INTER_AREA)
        tile = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)  # (h, w, 3)
        if self.blur_sigma > 0:
            tile = cv2.GaussianBlur(tile, (0, 0), self.blur_sigma)
        return tile
