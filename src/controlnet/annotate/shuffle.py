"""Content shuffle (ControlNet 1.1 "shuffle"): the image warped by a smooth random flow field.

As the reference `ContentShuffleDetector`: two smooth noise fields ("noise disks", uniform noise on a grid
`f` pixels apart, cubic-upsampled and min-max normalised) give, for every output pixel, the source
coordinates to sample, so colours and textures stay but the layout is scrambled.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from controlnet.annotate.base import MAX_DETECT_RESOLUTION, Annotator
from controlnet.settings_cli import setting

DEFAULT_NOISE_PERIOD = 256  # reference `f=256`: pixels between random control points of the flow


def noise_disk(height: int, width: int, period: int, rng: np.random.Generator) -> np.ndarray:
    """(height, width) float64 smooth noise in [0, 1]: random values every `period` px, cubic-interpolated."""
    coarse = rng.uniform(0.0, 1.0, size=(height // period + 2, width // period + 2))
    fine = cv2.resize(coarse, (width + 2 * period, height + 2 * period), interpolation=cv2.INTER_CUBIC)
    fine = fine[period : period + height, period : period + width]  # (height, width)
    fine = fine - fine.min()
    return fine / max(fine.max(), 1e-12)


@dataclass
class Shuffle(Annotator):
    """Shuffled image: (H, W, 3) uint8 with the input's colours in a scrambled layout."""

    noise_period: int = setting(DEFAULT_NOISE_PERIOD, ge=1, le=MAX_DETECT_RESOLUTION)
    """Pixels between the flow field's random control points (reference `f`)."""
    seed: int | None = setting(None, ge=0, le=2**32 - 1)
    """Random seed; None draws a fresh shuffle every call."""

    name = "shuffle"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.noise_period, int) or isinstance(self.noise_period, bool):
            raise ValueError(f"noise_period: got {self.noise_period!r}; expected an integer >= 1")

    def detect(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        rng = np.random.default_rng(self.seed)
        source_x = noise_disk(height, width, self.noise_period, rng) * float(width - 1)  # (h, w)
        source_y = noise_disk(height, width, self.noise_period, rng) * float(height - 1)
        flow = np.stack([source_x, source_y], axis=2).astype(np.float32)  # (h, w, 2)
        return cv2.remap(image, flow, None, cv2.INTER_LINEAR)
