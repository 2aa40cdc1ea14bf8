"""One sample of the built-in world: an image, its caption, its condition maps and the truth they came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class WorldSample:
    """A rendered image with its prompt, condition images and geometric truth.

    `conditions` maps a condition name ("fill", "canny", "lines", "scribble", "pose", "seg", "depth",
    "normal") to an (H, W, 3) uint8 image in the convention the released ControlNets use. `truth` holds
    the exact quantities the metrics and tests compare against (masks, depth, normals, keypoints) as
    float/bool/int arrays; `info` holds small non-array facts (colour names, object kinds).
    """

    image: np.ndarray  # (H, W, 3) uint8 RGB
    prompt: str
    conditions: dict[str, np.ndarray]  # name -> (H, W, 3) uint8
    truth: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        height, width = self.image.shape[:2]
        assert self.image.shape == (height, width, 3) and self.image.dtype == np.uint8, self.image.shape
        for name, cond in self.conditions.items():
            assert cond.shape == (height, width, 3) and cond.dtype == np.uint8, (name, cond.shape, cond.dtype)
