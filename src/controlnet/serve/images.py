"""Images in requests: base64 or data: URIs only, decoded by io/images.py (bombs refused before decoding).

The one decoder of request images for every front door (the native /v1 API, the web-UI API, the detect route).
Its errors are io/images.py's types with the request field attached, so the app answers them by type
(serve/problems.py): `ImageTooLarge` (pixels over the limit, or encoded bytes over `max_bytes`) is 413, any other
`ImageError` (empty, not base64, not an image, truncated, a file path) is 422. No message text is ever matched.

No client-supplied file paths anywhere (upstream reads any server file a client names): a string that looks like
a path is refused with 422 rather than tried as base64, so a client that sends a path learns at once that the
server will not open it.
"""

from __future__ import annotations

import base64
import binascii
import re

from PIL import Image

from controlnet.errors import ImageError, ImageTooLarge
from controlnet.io.images import MAX_IMAGE_PIXELS, image_size, open_image
from controlnet.serve.limits import MAX_REQUEST_PIXELS

PATH_MESSAGE = "images are base64 or data: URIs; file paths are not accepted"
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)
_IMAGE_SUFFIX = re.compile(r"\.(png|jpe?g|webp|bmp|gif|tiff?)$", re.I)
_WINDOWS_PATH = re.compile(r"^[a-zA-Z]:[\\/]")


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


def decode_bytes(text: str, field: str, max_bytes: int | None = None) -> bytes:
    """The bytes of base64 text or a base64 data: URI (standard or URL-safe alphabet, padding optional).

    ImageError (422) for an empty value, a data: URI that is not base64 and text that is not base64 (a path says
    so); ImageTooLarge (413) for more than `max_bytes` bytes, told from the text's length before decoding."""
    if not isinstance(text, str):
        raise ImageError(f"{field}: expected a base64 image or a data: URI, got {type(text).__name__}", field)
    if not text.strip():
        raise ImageError(f"{field}: expected a base64 image or a data: URI, got an empty value", field)
    text = text.strip()
    match = _DATA_URI.match(text)
    if match:
        if not match.group("b64"):
            raise ImageError(f"{field}: a data: URI must be base64 (data:image/png;base64,...)", field)
        text = text[match.end() :]
    compact = re.sub(r"\s+", "", text).rstrip("=").replace("-", "+").replace("_", "/")
    size = len(compact) * 3 // 4  # 4 base64 characters carry 3 bytes
    if max_bytes is not None and size > max_bytes:
        raise ImageTooLarge(
            f"{field}: {size:,} bytes of encoded image, over the limit of {max_bytes:,} bytes", field
        )
    try:
        if len(compact) % 4 == 1:
            raise ValueError("truncated")
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        if not match and looks_like_path(text):
            raise ImageError(f"{field}: {PATH_MESSAGE}", field) from None
        raise ImageError(f"{field}: not valid base64 (expected a base64 image or a data: URI)", field) from None


class RequestImages:
    """The decoder of one request's images: each under `max_pixels` (--max-pixels; None: MAX_IMAGE_PIXELS) and all
    of them together under MAX_REQUEST_PIXELS (or `max_pixels`, if the server allows one image more), both read from
    the headers before anything is decoded. 16 images of 64 Mpx each in a 4 MB request went past 9 GB."""

    def __init__(self, max_pixels: int | None = None, max_total: int = MAX_REQUEST_PIXELS):
        self.max_pixels = max_pixels or MAX_IMAGE_PIXELS
        self.max_total = max(max_total, self.max_pixels)
        self.used = 0

    def charge(self, width: int, height: int, field: str) -> None:
        """Count an image's pixels; ImageTooLarge naming `field` when they bring the request over its total."""
        if self.used + width * height > self.max_total:
            raise ImageTooLarge(
                f"{field}: its {width}x{height} pixels bring this request's images to {self.used + width * height:,} "
                f"pixels, over the limit of {self.max_total:,} for all of a request's images together",
                field,
            )
        self.used += width * height

    def decode(self, value: str | None, field: str, *, blank_is_none: bool = False) -> Image.Image | None:
        return decode_image(value, field, self.max_pixels, blank_is_none=blank_is_none, budget=self)


def decode_image(
    value: str | None,
    field: str,
    max_pixels: int | None = None,
    *,
    max_bytes: int | None = None,
    blank_is_none: bool = False,
    budget: RequestImages | None = None,
) -> Image.Image | None:
    """A decoded PIL image from a request field; None when the field is null (and when it is "" with
    `blank_is_none`: the web UI's "no image").

    `max_pixels` (None: io/images.py's MAX_IMAGE_PIXELS) is checked on the header, before decoding; over it, or
    over `max_bytes` encoded bytes, raises ImageTooLarge; anything that is not a readable image raises ImageError.
    Both carry `field`. The value is decoded first and called a path only when it is not an image (so '/9j/...', a
    JPEG's base64, is an image); a path is never opened, its refusal only says so. `budget`: the request's
    `RequestImages`, charged with the image's pixels (from its header) before it is decoded.
    """
    if value is None or (blank_is_none and isinstance(value, str) and not value.strip()):
        return None
    data = decode_bytes(value, field, max_bytes)
    try:
        if budget is not None:
            budget.charge(*image_size(data, field, max_pixels or MAX_IMAGE_PIXELS), field)
        return open_image(data, field, max_pixels or MAX_IMAGE_PIXELS)
    except ImageTooLarge as err:
        err.field = field
        raise
    except ImageError as err:
        if not _DATA_URI.match(value.strip()) and looks_like_path(value):
            raise ImageError(f"{field}: {PATH_MESSAGE}", field) from None
        err.field = field
        raise
