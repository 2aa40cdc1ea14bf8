"""The annotator interface: a callable `(H, W, 3) uint8 -> (H, W, C) uint8` with the reference resizing.

Every annotator is a dataclass whose fields are its options (validated in `__post_init__`). Calling it
runs the reference pipeline: HWC3 -> short side to `detect_resolution` (multiples of 64) -> `detect`
-> resize back to the input's size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np

from controlnet.annotate.image import LATENT_MULTIPLE, hwc3, resize_for_detection
from controlnet.settings_cli import check_bounds, describe_range, meta, setting

DEFAULT_DETECT_RESOLUTION = 512  # the reference gradio apps' default detect resolution
MAX_SIGMA = 64.0  # Gaussian sigmas in pixels: a blur's kernel spans ~6 sigma, so its time grows with it
MAX_DETECT_RESOLUTION = 16384  # a short side past any photo; what a resolution costs is capped by detect_size
# Every numeric option declares its range once, with `setting(default, ge=, le=)`: `__post_init__` checks them all
# (finite, in range), and the server's request models copy them (serve/annotators.py). An upper bound is where the
# option's cost or meaning ends: a blur sigma of 1e4 took 34 s on a 64 px image, and an infinite one grew the
# server until the kernel killed it (issue 27).


@dataclass
class Annotator:
    """Base class: subclasses implement `detect` on an (h, w, 3) uint8 image at the detect resolution."""

    detect_resolution: int | None = setting(
        DEFAULT_DETECT_RESOLUTION, ge=LATENT_MULTIPLE, le=MAX_DETECT_RESOLUTION
    )
    """Short side the image is resized to before detection (rounded to multiples of 64); None: keep the size."""

    name: ClassVar[str] = ""
    # How the map is resized back to the input size (the reference uses linear for edge maps).
    output_interpolation: ClassVar[int] = cv2.INTER_LINEAR

    def __post_init__(self) -> None:
        if self.detect_resolution is not None and (
            isinstance(self.detect_resolution, bool) or not isinstance(self.detect_resolution, int)
        ):
            raise ValueError(
                f"detect_resolution: got {self.detect_resolution!r}; expected an integer >= {LATENT_MULTIPLE} or None"
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            items = value if isinstance(value, (list, tuple)) else [value]
            bounded = any(meta(f, key) is not None for key in ("ge", "gt", "le"))
            if bounded and any(
                isinstance(v, bool) or not isinstance(v, (int, float)) for v in items if v is not None
            ):
                expected = describe_range(f.name, meta(f, "ge"), meta(f, "gt"), meta(f, "le"))
                raise ValueError(f"{f.name}: got {value!r}; expected a number, {expected}")
        check_bounds(self)

    def detect(self, image: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8 RGB -> (h, w) or (h, w, C) uint8 map at the same size."""
        raise NotImplementedError

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Input conventions: HWC3 (grayscale repeated, alpha composited on white, 16-bit scaled down)."""
        return hwc3(image)

    def detect_map(self, image: np.ndarray) -> np.ndarray:
        """The map at the detect resolution: (h, w, C) uint8 with h, w multiples of 64 (reference layout)."""
        return self._detect_prepared(self.prepare(image))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, C_in) image -> (H, W, C) uint8 map at the input's size."""
        prepared = self.prepare(image)  # (H, W, 3)
        height, width = prepared.shape[:2]
        detected = self._detect_prepared(prepared)  # (h, w, C)
        if detected.shape[:2] == (height, width):
            return detected
        resized = cv2.resize(detected, (width, height), interpolation=self.output_interpolation)
        return resized[:, :, None] if resized.ndim == 2 else resized

    def _detect_prepared(self, image: np.ndarray) -> np.ndarray:
        if self.detect_resolution is not None:
            image = resize_for_detection(image, self.detect_resolution)  # (h, w, 3)
        detected = self.detect(image)
        return hwc3(detected) if detected.ndim == 2 or detected.shape[2] == 1 else detected
