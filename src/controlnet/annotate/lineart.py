"""Standard line art: a difference of Gaussians that keeps dark strokes (ControlNet 1.1 "lineart_standard").

Same operations as controlnet_aux's `LineartStandardDetector` (from the WebUI extension): blur with
sigma `gaussian_sigma`, keep how much darker each pixel is than its surroundings (darkest channel), divide
by the median of the clearly-dark responses (at least 16) and scale by 127. White lines on black; the
map is resized back with cubic interpolation as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from controlnet.annotate.base import MAX_SIGMA, Annotator
from controlnet.settings_cli import setting

DEFAULT_GAUSSIAN_SIGMA = 6.0  # reference default `guassian_sigma`
DEFAULT_INTENSITY_THRESHOLD = 8  # reference: responses above this define the median used to normalise
MIN_NORMALISER = 16.0  # reference: `max(16, median(...))`
LINE_GAIN = 127.0  # reference: a median-strength stroke maps to grey 127


@dataclass
class LineartStandard(Annotator):
    """Line-art map: (H, W, 3) uint8, white strokes on black."""

    gaussian_sigma: float = setting(DEFAULT_GAUSSIAN_SIGMA, ge=1e-3, le=MAX_SIGMA)
    """Blur sigma (pixels at the detect resolution) of the surround each pixel is compared with."""
    intensity_threshold: float = setting(DEFAULT_INTENSITY_THRESHOLD, ge=0, le=255)
    """Responses above this are the strokes whose median normalises the map."""

    name = "lineart_standard"
    output_interpolation = cv2.INTER_CUBIC

    def detect(self, image: np.ndarray) -> np.ndarray:
        pixels = image.astype(np.float32)  # (h, w, 3)
        surround = cv2.GaussianBlur(pixels, (0, 0), self.gaussian_sigma)
        darker = np.min(surround - pixels, axis=2).clip(0, 255)  # (h, w)
        strokes = darker[darker > self.intensity_threshold]
        normaliser = max(MIN_NORMALISER, float(np.median(strokes))) if strokes.size else MIN_NORMALISER
        return (darker / np.float32(normaliser) * np.float32(LINE_GAIN)).clip(0, 255).astype(np.uint8)
