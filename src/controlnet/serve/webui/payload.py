"""Image fields of web-UI requests and responses: base64 text in, base64 PNGs out. Never a file path.

Clients send images as raw base64 (webuiapi's unit images), as data URIs (`data:image/png;base64,...`: its init
and detect images), with or without padding. Upstream also takes a string that names a file on the server, a hole
(any client reads any image the server can): here such a string is refused with a 422 that says so, and nothing is
ever looked up on disk. Decoding goes through io/images.py `open_image`, which refuses an image whose header claims
more than MAX_IMAGE_PIXELS before a pixel is decoded (a decompression bomb: 413) and corrupt data (422).

Marked duplication of serve/images.py (the native API's decoder): the web UI's forms differ. "" means "no image"
here, and raw base64 of a JPEG starts with "/9j/", which a path check run before decoding would refuse; so strings
of the base64 alphabet are decoded first and called a path only when they are not an image.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image

from controlnet.errors import ImageError
from controlnet.io.images import MAX_IMAGE_PIXELS, open_image

DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(;[\w.+-]+=[\w.+-]+)*;base64,", re.IGNORECASE)
_BASE64_TEXT = re.compile(r"^[A-Za-z0-9+/\-_=\s]*$")
# What a path looks like: absolute (POSIX or Windows), home, relative, a file: URL, or a name ending in an image
# suffix. Only used to word the refusal: a path is never opened. '/9j/...' (a JPEG's base64) starts like a path, so
# strings of the base64 alphabet are decoded first and called a path only when they are not an image.
_PATH_LIKE = re.compile(r"^(~|\.{1,2}[\\/]|[A-Za-z]:[\\/]|file:|\\\\|/)")
_IMAGE_SUFFIX = re.compile(r"\.(png|jpe?g|webp|bmp|gif|tiff?)$", re.IGNORECASE)
MAX_PATH_LENGTH = 4096  # longer strings are not paths anyone typed
TOO_LARGE_MARK = "over the limit"  # io/images.py's words for an image refused by its pixel count


class PayloadError(ValueError):
    """A request field that cannot be used: `status` 422 (bad value) or 413 (too large), `field` names it."""

    def __init__(self, field: str, message: str, status: int = 422):
        self.field, self.status, self.message = field, status, message
        super().__init__(f"{field}: {message}")


def looks_like_path(text: str) -> bool:
    """True for strings such as /data/in.png, C:\\img.png, ./x.png, ~/x.png, file:///x (never opened)."""
    return len(text) <= MAX_PATH_LENGTH and bool(_PATH_LIKE.search(text) or _IMAGE_SUFFIX.search(text))


def decode_base64(body: str, field: str) -> bytes:
    """The bytes of base64 text (standard or URL-safe alphabet, padding optional, whitespace ignored)."""
    compact = re.sub(r"\s+", "", body).rstrip("=").replace("-", "+").replace("_", "/")
    if len(compact) % 4 == 1:
        raise PayloadError(field, "truncated base64 (its length is not that of any encoded data)")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise PayloadError(field, f"invalid base64 ({err})") from None


def _path_message(text: str) -> str:
    shown = text if len(text) <= 80 else text[:77] + "..."
    return (
        f"{shown!r} looks like a file path; this server never reads files named by a client: send the image "
        "itself as base64 or a data URI"
    )


def decode_image(value, field: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image | None:
    """A decoded PIL image from a base64 field; None for a missing or empty field ("" means no image)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise PayloadError(field, f"expected base64 text or a data URI, got {type(value).__name__}")
    text = value.strip()
    uri = DATA_URI.match(text)
    body = text[uri.end() :] if uri else text
    if not _BASE64_TEXT.match(body):
        if not uri and looks_like_path(text):
            raise PayloadError(field, _path_message(text))
        raise PayloadError(field, "not base64 image data (expected raw base64 or a data:image/...;base64, URI)")
    try:
        return open_image(decode_base64(body, field), field, max_pixels)
    except (ImageError, PayloadError) as err:
        if TOO_LARGE_MARK in str(err):
            raise PayloadError(field, str(err).removeprefix(f"{field}: "), status=413) from None
        if not uri and looks_like_path(text):
            raise PayloadError(field, _path_message(text)) from None
        raise PayloadError(field, str(err).removeprefix(f"{field}: ")) from None


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """Raw base64 (no data: prefix, as the web UI answers) of a PNG; `parameters` becomes its infotext chunk."""
    from PIL import PngImagePlugin

    info = None
    if parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
