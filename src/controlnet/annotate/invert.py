"""Invert: 255 - image, turning black-on-white drawings into the white-on-black maps ControlNets expect."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controlnet.annotate.base import Annotator


@dataclass
class Invert(Annotator):
    """(H, W, 3) uint8 negative of the input (WebUI extension's "invert" preprocessor)."""

    detect_resolution: int | None = None

    name = "invert"

    def detect(self, image: np.ndarray) -> np.ndarray:
        return np.uint8(255) - image  # (h, w, 3)
