"""Errors meant for users. The CLI prints these as one line and exits non-zero; anything else is a bug."""


class ControlNetError(ValueError):
    """Bad input from a user: names the argument, the value received and what was expected."""


class CheckpointError(ControlNetError):
    """A weights file that cannot be read, is unsafe, truncated, or holds an unexpected architecture."""


class ImageError(ControlNetError):
    """An image that cannot be read safely: too large to be real (a decompression bomb), truncated, corrupt, or not
    an image at all. Raised before any pixel is decoded where the header already tells.

    `field`: the request field the image came in (a server names it in its answer), None elsewhere."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ImageTooLarge(ImageError):
    """An image over a size limit: more pixels than allowed (told by its header, before decoding: a likely
    decompression bomb) or more encoded bytes than one image may have. A server answers 413, not 422."""
