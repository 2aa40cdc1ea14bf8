"""Reading the images users bring, refusing the ones that cannot be real before a pixel is decoded.

Every image a user hands us goes through `open_image` (or `image_size` for a header-only check): annotator
inputs, generation conditions, init images and masks, dataset samples, and (next) uploads to the HTTP server.
A PNG of a few KB can claim 60000 x 60000 pixels: its header is read in microseconds, but decoding it would
allocate 3.6 GB per channel (OpenCV stops with an assertion traceback, PIL with `DecompressionBombError`).
So the header size is checked first (`Image.open` is lazy: it parses the header and stops), and only images
under `MAX_IMAGE_PIXELS` are decoded. Truncated and corrupt files are refused with one line naming the file
instead of PIL's `OSError: image file is truncated` or `UnidentifiedImageError`. Errors are `ImageError`, a
`ValueError`, so the CLI prints one line and exits 2; an image over the size limit is its subclass `ImageTooLarge`
(a server answers 413 to it, by type).

The other direction is here too: `png_bytes` / `png_base64` / `png_data_uri` encode an image as the PNG every front
door sends (the native API, the web-UI API, the web page's "copy as API request"), text chunks included.

Why here: `io/` reads the files users bring (checkpoints and now images), and this module imports only PIL and
`controlnet.errors`, so `annotate/` (which must import no `model/`), `data/`, `generate/` and `serve/` can all
use it without pulling in torch.
"""

from __future__ import annotations

import base64
import io
import os
import re
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from controlnet.errors import ImageError, ImageTooLarge

# 2**26 = 67,108,864 pixels (e.g. 8192 x 8192). Above every full-frame camera (61 MP: 9504 x 6336) and 4096 x 4096
# texture, and 64x the largest generation a ControlNet serves (SDXL's 1024 x 1024; every condition is resized to
# the generated size, annotators detect at a short side of 512-2048), so nothing real is refused that a model could
# use; larger photos (100 MP medium format, 200 MP phone modes) are downscaled first. Decoded as RGBA it is at most
# 256 MiB. It also sits below PIL's own warning threshold (Image.MAX_IMAGE_PIXELS, 89.5 MP), so PIL never warns or
# refuses an image this limit lets through. A server reuses it or passes a smaller `max_pixels`.
MAX_IMAGE_PIXELS = 2**26
# PIL's DecompressionBombError fires in Image.open above 2 x Image.MAX_IMAGE_PIXELS, before we see the size; its
# message ("Image size (N pixels) exceeds ...") is the only place the claimed pixel count is then available.
_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
# What PIL's decoders raise on damaged data: OSError (truncated, broken stream), SyntaxError (bad chunks or
# markers), EOFError, struct.error / IndexError / TypeError / ValueError from header parsing.
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, struct.error, IndexError, TypeError, ValueError)


def _label(source, what: str) -> str:
    return what if isinstance(source, (bytes, bytearray, memoryview)) else f"{what} {source}"


def _fp(source, what: str):
    """A file argument for Image.open; missing paths are a FileNotFoundError naming `what`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{what} not found: {path}")
        return path
    raise TypeError(f"{what}: expected encoded bytes or a path, got {type(source).__name__}")


def check_pixels(width: int, height: int, label: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse a `width` x `height` image over `max_pixels` (raises ImageTooLarge naming `label`)."""
    if width * height > max_pixels:
        raise ImageTooLarge(_too_large(label, width * height, max_pixels, f"{width}x{height} = "))


def _too_large(label: str, pixels: int, max_pixels: int, dims: str = "") -> str:
    return (
        f"{label}: {dims}{pixels:,} pixels, over the limit of {max_pixels:,} ({max_pixels / 2**20:g} megapixels); "
        "refusing to decode it (a likely decompression bomb; downscale a real image first)"
    )


@contextmanager
def _header(source, what: str, max_pixels: int):
    """The image opened lazily (header parsed, no pixels decoded) and size-checked; closed on exit."""
    label = _label(source, what)
    fp = _fp(source, what)
    # catch_warnings edits the process-wide filter list (context-local only from Python 3.14): at worst a
    # concurrent thread sees PIL's warning, which our own size check makes redundant
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
        try:
            image = Image.open(fp)
        except Image.DecompressionBombError as err:
            claimed = _PIL_BOMB_PIXELS.search(str(err))
            pixels = int(claimed.group(1)) if claimed else 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1
            raise ImageTooLarge(_too_large(label, pixels, max_pixels)) from None
        except UnidentifiedImageError:
            raise ImageError(f"{label}: cannot read it as an image (no format PIL reads recognises it)") from None
        except _DECODE_ERRORS as err:
            raise ImageError(f"{label}: cannot read its header, the file is corrupt ({err})") from None
        with image:
            check_pixels(*image.size, label, max_pixels)
            yield image, label


def image_size(source, what: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) from the header of a path or encoded bytes, without decoding; refuses an image over
    `max_pixels` and a file that is not an image (a truncated one is only found by `open_image`)."""
    with _header(source, what, max_pixels) as (image, _):
        return image.size


def open_image(source, what: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A fully decoded PIL image (its own mode, the file closed) from a path or encoded bytes.

    Refuses, with one ImageError line naming `what` and the path: an image whose header claims more than
    `max_pixels` (before decoding), a file that is not an image, and a truncated or corrupt one. A missing path
    is a FileNotFoundError. `max_pixels` above PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS) has no effect.
    """
    with _header(source, what, max_pixels) as (image, label):
        try:
            image.load()
        except Image.DecompressionBombError as err:  # some formats (ICO, animated GIF frames) check again here
            raise ImageTooLarge(f"{label}: {err}") from None
        except _DECODE_ERRORS as err:
            raise ImageError(f"{label}: cannot read it, the file is truncated or corrupt ({err})") from None
        return image  # closing the file keeps the decoded pixels


def png_bytes(image: Image.Image, text: dict[str, str] | PngImagePlugin.PngInfo | None = None) -> bytes:
    """`image` encoded as PNG; `text`: its text chunks ({"parameters": infotext}) or a ready PngInfo."""
    info = text
    if isinstance(text, dict):
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_base64(image: Image.Image, text: dict[str, str] | PngImagePlugin.PngInfo | None = None) -> str:
    """Raw base64 of `png_bytes` (no data: prefix), as the web-UI API and the native API answer."""
    return base64.b64encode(png_bytes(image, text)).decode("ascii")


def png_data_uri(image: Image.Image, text: dict[str, str] | PngImagePlugin.PngInfo | None = None) -> str:
    """`data:image/png;base64,...` of `png_bytes`, as request bodies carry images."""
    return "data:image/png;base64," + png_base64(image, text)
