"""Surface normals from a depth map (paper Sec. 4, "normal maps"; reference "normal from MiDaS").

As the reference ControlNet 1.0 `apply_midas`: n ~ (Sobel_x(d), Sobel_y(d), a) with d the depth image
(near = bright, as every released depth ControlNet expects), a = 2 pi, normals set to face the camera
where the min-max normalised depth is below `background_threshold`, then encoded as `n * 127.5 + 127.5`.
With that sign convention the channels read (left, up, front) -- red = facing left, green = facing up,
blue = facing the viewer, the ControlNet 1.1 normal protocol. `channel_order="bgr"` gives the
(front, up, left) order of controlnet_aux's MiDaS normal output.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from controlnet.annotate.base import Annotator
from controlnet.annotate.image import UINT16_TO_UINT8, hwc3
from controlnet.settings_cli import setting

DEFAULT_FLATNESS = 2.0 * np.pi  # reference `a=np.pi * 2.0`: the z component before normalisation
DEFAULT_BACKGROUND_THRESHOLD = 0.1  # reference `bg_th=0.1` on the min-max normalised depth
NORMAL_HALF_RANGE = 127.5  # [-1, 1] -> [0, 255]
CHANNEL_ORDERS = ("rgb", "bgr")


def normals_from_depth(
    depth: np.ndarray,
    flatness: float = DEFAULT_FLATNESS,
    background_threshold: float = DEFAULT_BACKGROUND_THRESHOLD,
) -> np.ndarray:
    """(H, W) depth (near = large, any units, e.g. 0..255) -> (H, W, 3) float32 unit normals (left, up, front)."""
    depth = np.asarray(depth, np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth: got shape {depth.shape}; expected (H, W)")
    gx = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)  # (H, W): 8 x d(depth)/d(column)
    gy = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)  # (H, W): 8 x d(depth)/d(row)
    span = float(depth.max() - depth.min())
    normalised = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
    background = normalised < background_threshold
    gx[background] = 0
    gy[background] = 0
    normal = np.stack([gx, gy, np.full_like(gx, flatness)], axis=2)  # (H, W, 3)
    return normal / np.linalg.norm(normal, axis=2, keepdims=True)


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """(H, W, 3) float normals in [-1, 1] -> (H, W, 3) uint8 (reference: `n * 127.5 + 127.5`, truncated)."""
    return (normals * NORMAL_HALF_RANGE + NORMAL_HALF_RANGE).clip(0, 255).astype(np.uint8)


@dataclass
class NormalFromDepth(Annotator):
    """Normal map from a depth image (near = bright): (H, W, 3) uint8."""

    flatness: float = setting(DEFAULT_FLATNESS, ge=1e-6, le=1e6)
    """z component before normalisation (reference `a`); larger values give flatter-looking normals."""
    background_threshold: float = setting(DEFAULT_BACKGROUND_THRESHOLD, ge=0, le=1)
    """Normalised depth below which normals face the camera (reference `bg_th`)."""
    channel_order: str = "rgb"
    """"rgb": (left, up, front), ControlNet 1.1 protocol; "bgr": controlnet_aux MiDaS order."""

    name = "normal"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order: got {self.channel_order!r}; expected one of {CHANNEL_ORDERS}")

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """16-bit depth keeps its precision (as float32 in 0..255 units); other inputs follow HWC3."""
        if isinstance(image, np.ndarray) and image.dtype == np.uint16 and image.ndim in (2, 3):
            depth = image.astype(np.float32) / np.float32(UINT16_TO_UINT8)
            depth = depth if depth.ndim == 2 else depth[:, :, :3].mean(axis=2)  # (H, W)
            return np.repeat(depth[:, :, None], 3, axis=2)  # (H, W, 3) float32
        return hwc3(image)

    def detect(self, image: np.ndarray) -> np.ndarray:
        depth = image.astype(np.float32).mean(axis=2)  # (h, w): grey depth image, channels equal
        encoded = encode_normals(normals_from_depth(depth, self.flatness, self.background_threshold))
        return np.ascontiguousarray(encoded[:, :, ::-1]) if self.channel_order == "bgr" else encoded
