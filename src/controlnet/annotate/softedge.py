"""Classical soft edges: multi-scale gradient magnitude, a weight-free stand-in for HED / PiDiNet maps.

The HED ControlNet (paper Sec. 4, "HED boundary") is conditioned on soft, thick, grey-level boundaries
fused from several scales. This annotator fuses scale-normalised Gaussian-derivative magnitudes
(Lindeberg's sigma * |grad| normalisation) at `sigmas`, takes the strongest colour channel, and maps the
`percentile`-th value of the fused response to white.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from controlnet.annotate.base import MAX_SIGMA, Annotator
from controlnet.settings_cli import check_bounds, setting

DEFAULT_SIGMAS = (1.0, 2.0, 4.0)  # pixels at the detect resolution: fine to coarse boundaries
DEFAULT_PERCENTILE = 99.0  # the fused response at this percentile maps to 255
MAX_SIGMAS = 8  # each scale is one more blur of the whole image
SOBEL_GAIN = 8.0  # a 3x3 Sobel returns 8x the derivative of a linear ramp


@dataclass
class SoftEdge(Annotator):
    """Soft boundary map: (H, W, 3) uint8 grey levels, white on strong boundaries."""

    sigmas: tuple[float, ...] = setting(DEFAULT_SIGMAS, gt=0, le=MAX_SIGMA)
    """Gaussian scales (pixels at the detect resolution) whose gradient magnitudes are averaged."""
    percentile: float = setting(DEFAULT_PERCENTILE, ge=50, le=100)
    """Percentile of the fused response that maps to white (higher: darker, sparser map)."""

    name = "softedge"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sigmas = tuple(self.sigmas)
        if not 0 < len(self.sigmas) <= MAX_SIGMAS or any(
            isinstance(s, bool) or not isinstance(s, (int, float)) for s in self.sigmas
        ):
            raise ValueError(f"sigmas: got {self.sigmas!r}; expected 1 to {MAX_SIGMAS} positive numbers")
        check_bounds(self)  # again: the sigmas are a tuple only now

    def response(self, image: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8 -> (h, w) float32 fused gradient magnitude (intensity units per pixel)."""
        pixels = image.astype(np.float32)  # (h, w, 3)
        fused = np.zeros(image.shape[:2], np.float32)  # (h, w)
        for sigma in self.sigmas:
            blurred = cv2.GaussianBlur(pixels, (0, 0), sigma)
            gx = cv2.Sobel(blurred, cv2.CV_32F, 1, 0, ksize=3) / SOBEL_GAIN  # (h, w, 3)
            gy = cv2.Sobel(blurred, cv2.CV_32F, 0, 1, ksize=3) / SOBEL_GAIN
            fused += sigma * np.sqrt(gx * gx + gy * gy).max(axis=2)
        return fused / len(self.sigmas)

    def detect(self, image: np.ndarray) -> np.ndarray:
        fused = self.response(image)  # (h, w)
        scale = max(float(np.percentile(fused, self.percentile)), 1e-6)
        return (fused / scale * 255.0).clip(0, 255).astype(np.uint8)
