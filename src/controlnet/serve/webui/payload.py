"""Image fields of web-UI requests and responses: base64 text in, base64 PNGs out. Never a file path.

Clients send images as raw base64 (webuiapi's unit images), as data URIs (`data:image/png;base64,...`: its init
and detect images), with or without padding. Upstream also takes a string that names a file on the server, a hole
(any client reads any image the server can): here such a string is refused with a 422 that says so, and nothing is
ever looked up on disk. Decoding goes through io/images.py `open_image`, which refuses an image whose header claims
more than MAX_IMAGE_PIXELS before a pixel is decoded (a decompression bomb: 413) and corrupt data (422).

The decoding itself is serve/images.py's (one decoder for every front door); this module adds the web UI's forms
("" = no image) and its error type.
"""

from __future__ import annotations

import base64
import io

from PIL import Image

from controlnet.io.images import MAX_IMAGE_PIXELS
from controlnet.serve import images as serve_images
from controlnet.serve.problems import ApiError


class PayloadError(ValueError):
    """A request field that cannot be used: `status` 422 (bad value) or 413 (too large), `field` names it."""

    def __init__(self, field: str, message: str, status: int = 422):
        self.field, self.status, self.message = field, status, message
        super().__init__(f"{field}: {message}")


def decode_image(value, field: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image | None:
    """A decoded PIL image from a base64 field; None for a missing or empty field ("" means no image)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise PayloadError(field, f"expected base64 text or a data URI, got {type(value).__name__}")
    try:
        return serve_images.decode_image(value, field, max_pixels)
    except ApiError as err:
        raise PayloadError(field, err.detail.removeprefix(f"{field}: "), status=err.status) from None


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
