"""Inpainting mask (ControlNet 1.1 "inpaint"): which pixels the model must repaint.

The mask comes from the image's alpha channel (transparent = repaint, as the WebUI extension reads a
painted-over upload) or, for images without alpha, from a painted mask image (bright = repaint, the
Stable Diffusion inpainting convention). `masked_condition` builds the released inpaint ControlNet's
input: the image in [0, 1] with masked pixels set to -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controlnet.annotate.base import Annotator
from controlnet.annotate.image import hwc3, to_uint8
from controlnet.settings_cli import setting

DEFAULT_THRESHOLD = 128  # alpha below / brightness at or above this marks a pixel to repaint
MASKED_VALUE = -1.0  # the inpaint ControlNet's value for pixels to repaint


@dataclass
class InpaintMask(Annotator):
    """Binary mask: (H, W, 3) uint8, 255 where the model must repaint, 0 where the image is kept."""

    detect_resolution: int | None = None
    threshold: int = setting(DEFAULT_THRESHOLD, ge=1, le=255)
    """Alpha < threshold (RGBA input) or brightness >= threshold (mask image) marks a pixel to repaint."""

    name = "inpaint"

    def prepare(self, image: np.ndarray) -> np.ndarray:
        image = to_uint8(image)
        if image.ndim == 3 and image.shape[2] in (2, 4):
            alpha = image[:, :, -1]  # (H, W)
            repaint = alpha < self.threshold
        else:
            repaint = hwc3(image).max(axis=2) >= self.threshold  # (H, W)
        return np.repeat((repaint * np.uint8(255))[:, :, None], 3, axis=2)  # (H, W, 3)

    def detect(self, image: np.ndarray) -> np.ndarray:
        return image


def masked_condition(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image + (H, W[, C]) uint8 mask (255 = repaint) -> (H, W, 3) float32 in [0, 1], -1 where masked."""
    image = hwc3(image)
    mask = np.asarray(mask)
    if mask.shape[:2] != image.shape[:2]:
        raise ValueError(f"mask: got shape {mask.shape}; expected the image's size {image.shape[:2]}")
    repaint = (mask if mask.ndim == 2 else mask.max(axis=2)) >= DEFAULT_THRESHOLD  # (H, W)
    condition = image.astype(np.float32) / 255.0
    condition[repaint] = MASKED_VALUE
    return condition
