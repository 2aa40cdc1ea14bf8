"""Images in requests: base64 or data: URIs only, decoded by io/images.py (bombs refused before decoding).

No client-supplied file paths anywhere (issue 14, item 6): a string that looks like a path is refused with 422
rather than tried as base64, so a client that sends a path learns at once that the server will not open it.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image

from controlnet.errors import ImageError
from controlnet.io.images import MAX_IMAGE_PIXELS, open_image
from controlnet.serve.problems import ApiError

PATH_MESSAGE = "images are base64 or data: URIs; file paths are not accepted"
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)
_IMAGE_SUFFIX = re.compile(r"\.(png|jpe?g|webp|bmp|gif|tiff?)$", re.I)
_WINDOWS_PATH = re.compile(r"^[a-zA-Z]:[\\/]")
TOO_LARGE_MARK = "over the limit"  # io/images.py's words for an image refused by its pixel count


def looks_like_path(text: str) -> bool:
    """'/x/y.png', './a.png', '../a', '~/a', 'C:\\a', 'file:...', 'photo.jpg'. Only asked of a string that did not
    decode as an image: raw base64 of a JPEG starts with '/9j/', which looks like a path but is an image."""
    t = text.strip()
    return (
        t.startswith(("/", "./", "../", "~", "file:", "\\\\"))
        or bool(_WINDOWS_PATH.match(t))
        or "\\" in t
        or (len(t) < 4096 and bool(_IMAGE_SUFFIX.search(t)))
        or ("." in t[:4096] and not t.startswith("data:"))
    )


def decode_bytes(text: str, field: str) -> bytes:
    """The bytes of base64 text or a base64 data: URI (standard or URL-safe alphabet, padding optional)."""
    if not isinstance(text, str) or not text.strip():
        raise ApiError(422, f"{field}: expected a base64 image or a data: URI, got an empty value", field)
    text = text.strip()
    match = _DATA_URI.match(text)
    if match:
        if not match.group("b64"):
            raise ApiError(422, f"{field}: a data: URI must be base64 (data:image/png;base64,...)", field)
        text = text[match.end() :]
    compact = re.sub(r"\s+", "", text).rstrip("=").replace("-", "+").replace("_", "/")
    try:
        if len(compact) % 4 == 1:
            raise ValueError("truncated")
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        if not match and looks_like_path(text):
            raise ApiError(422, f"{field}: {PATH_MESSAGE}", field) from None
        raise ApiError(422, f"{field}: not valid base64 (expected a base64 image or a data: URI)", field) from None


def decode_image(text: str, field: str, max_pixels: int | None = None) -> Image.Image:
    """A decoded PIL image; 413 over `max_pixels` (checked on the header, before decoding), 422 if undecodable.

    Decoded first, called a path only when it is not an image (so '/9j/...', a JPEG's base64, is an image); a path
    is never opened, its refusal only says so.
    """
    data = decode_bytes(text, field)
    try:
        return open_image(data, field, max_pixels or MAX_IMAGE_PIXELS)
    except ImageError as err:
        if TOO_LARGE_MARK in str(err):
            raise ApiError(413, str(err), field) from None
        if not _DATA_URI.match(text.strip()) and looks_like_path(text):
            raise ApiError(422, f"{field}: {PATH_MESSAGE}", field) from None
        raise ApiError(422, str(err), field) from None


def png_base64(image: Image.Image, pnginfo=None) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_bytes(image: Image.Image, pnginfo=None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    return buffer.getvalue()
