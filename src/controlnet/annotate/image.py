"""Image conventions shared by every annotator: HWC3, the detect-resolution resize, reading files.

The reference ControlNet (lllyasviel/ControlNet `annotator/util.py`, mirrored by controlnet_aux) feeds
each detector an (H, W, 3) uint8 RGB image whose short side was resized to a *detect resolution* and
whose sides were rounded to multiples of 64; the detected map is then resized back. `hwc3` is that
repository's HWC3 (grayscale -> 3 channels, RGBA composited on white), extended to 16-bit and to
grayscale + alpha.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from controlnet.atomic import atomic_path

LATENT_MULTIPLE = 64  # the reference rounds both sides to multiples of 64 (8 latent pixels x 8 VAE factor)
UINT16_TO_UINT8 = 257.0  # 65535 / 255: maps 16-bit full scale exactly onto 8-bit full scale
WHITE = 255  # the reference HWC3 composites transparent pixels on white
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def to_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Scale a uint8 / uint16 / bool array (or a PIL image) to uint8; anything else is a clear error."""
    if not isinstance(image, np.ndarray) and hasattr(image, "__array_interface__"):  # PIL images
        image = np.asarray(image)
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return np.round(image.astype(np.float32) / UINT16_TO_UINT8).astype(np.uint8)
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    raise ValueError(f"{name}: unsupported dtype {image.dtype}; expected uint8, uint16 (scaled down) or bool")


def hwc3(image: np.ndarray, background: int = WHITE, name: str = "image") -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB image, as the reference HWC3 does.

    (H, W) and (H, W, 1) grayscale are repeated to 3 channels; (H, W, 2) grayscale + alpha and (H, W, 4) RGBA
    are composited over `background` (white in the reference: `color * alpha + 255 * (1 - alpha)`, then
    truncated); 16-bit and bool inputs are scaled to uint8 first.
    """
    image = to_uint8(image, name)
    if image.ndim == 2:
        image = image[:, :, None]  # (H, W, 1)
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(f"{name}: unsupported shape {image.shape}; expected (H, W), (H, W, 1|2|3|4)")
    channels = image.shape[2]
    if channels == 3:
        return image
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    color = image[:, :, :-1].astype(np.float32)  # (H, W, 1|3)
    alpha = image[:, :, -1:].astype(np.float32) / 255.0  # (H, W, 1)
    composited = (color * alpha + float(background) * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.repeat(composited, 3, axis=2) if channels == 2 else composited


def detect_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(h, w) after scaling the short side to `resolution` and rounding both to multiples of 64 (reference)."""
    scale = float(resolution) / min(height, width)
    h = int(np.round(height * scale / LATENT_MULTIPLE)) * LATENT_MULTIPLE
    w = int(np.round(width * scale / LATENT_MULTIPLE)) * LATENT_MULTIPLE
    if h < LATENT_MULTIPLE or w < LATENT_MULTIPLE:
        raise ValueError(
            f"detect_resolution: {resolution} turns a {height}x{width} image into {h}x{w}; "
            f"expected a resolution that keeps both sides >= {LATENT_MULTIPLE}"
        )
    return h, w


def resize_for_detection(image: np.ndarray, resolution: int) -> np.ndarray:
    """Resize (H, W, C) so its short side is ~`resolution` and both sides are multiples of 64.

    Same arithmetic and interpolation as the reference `resize_image`: Lanczos when enlarging, area when
    shrinking.
    """
    height, width = image.shape[:2]
    h, w = detect_size(height, width, resolution)
    enlarging = float(resolution) / min(height, width) > 1
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LANCZOS4 if enlarging else cv2.INTER_AREA)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB(A), keeping 16-bit depth and alpha: (H, W), (H, W, 3) or (H, W, 4)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input image not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ValueError(f"input: cannot read {path} as an image (not a format OpenCV can decode, or corrupt)")
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) RGB or (H, W) uint8 map atomically (controlnet.atomic)."""
    path = Path(path)
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(path.suffix or ".png", image)
    if not ok:
        raise ValueError(f"output: cannot encode an image as {path.suffix!r}")
    with atomic_path(path) as partial:
        partial.write_bytes(encoded.tobytes())
