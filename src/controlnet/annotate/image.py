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
from controlnet.io.images import open_image

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


# Pixels an annotator may be asked to work at (8192 x 8192): past any real photo at any resolution the reference
# offers; the server caps lower (serve/limits.py MAX_DETECT_PIXELS).
MAX_DETECT_PIXELS = 2**26


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


def detect_size(height: int, width: int, resolution: int, max_pixels: int = MAX_DETECT_PIXELS) -> tuple[int, int]:
    """(h, w) after scaling the short side to `resolution` and rounding both to multiples of 64 (reference).

    The reference puts no limit on the long side: a 1x1024 image at 512 becomes 512x524288 (268 Mpx, over 4 GB in
    any annotator). A size over `max_pixels` is refused here, before any resizing, naming both sizes."""
    scale = float(resolution) / min(height, width)
    h = int(np.round(height * scale / LATENT_MULTIPLE)) * LATENT_MULTIPLE
    w = int(np.round(width * scale / LATENT_MULTIPLE)) * LATENT_MULTIPLE
    if h < LATENT_MULTIPLE or w < LATENT_MULTIPLE:
        raise ValueError(
            f"detect_resolution: {resolution} turns a {height}x{width} image into {h}x{w}; "
            f"expected a resolution that keeps both sides >= {LATENT_MULTIPLE}"
        )
    if h * w > max_pixels:
        raise ValueError(
            f"detect_resolution: {resolution} turns a {height}x{width} (height x width) image into {h}x{w}, "
            f"{h * w:,} pixels; expected at most {max_pixels:,} (a lower detect_resolution, or an image closer "
            "to square)"
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
    """Read an image file as RGB(A), keeping alpha and 16-bit grayscale: (H, W), (H, W, 2|3|4) uint8/uint16/bool.

    Decoded by `controlnet.io.images.open_image`, which refuses images too large to be real (before decoding),
    truncated and corrupt files with one line naming the file. 16-bit colour is read as 8-bit (PIL has no 16-bit
    RGB mode: the high byte, at most 1 level from `to_uint8`'s rounding).
    """
    return pil_to_array(open_image(path, "input image"))


def pil_to_array(image) -> np.ndarray:
    """A decoded PIL image as the array `hwc3` takes: L/LA/RGB/RGBA/1 as they are, 16-bit grayscale as uint16,
    palettes as RGB (RGBA when they carry transparency), other colour spaces (CMYK, YCbCr, ...) as RGB."""
    if image.mode in ("L", "LA", "RGB", "RGBA", "1"):
        return np.asarray(image)
    if image.mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)  # (H, W), native byte order
    if image.mode == "I":  # 32-bit integer: 16-bit grayscale from some TIFF/PNG writers
        array = np.asarray(image)
        return array.astype(np.uint16) if array.min() >= 0 and array.max() <= 65535 else array
    if image.mode == "F":
        return np.asarray(image)  # float32: `to_uint8` refuses it with the dtype named
    alpha = "A" in image.mode or "a" in image.mode or "transparency" in image.info
    return np.asarray(image.convert("RGBA" if alpha else "RGB"))


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
