"""The web-UI request parsers' error: a field that cannot be used, named as the request spelled it (422).

Images are not decoded here: every front door uses serve/images.py `decode_image` (the web UI's "" = no image is
its `blank_is_none`), whose typed errors the app answers itself (413 too large, 422 unreadable). Upstream takes a
string that names a file on the server as an image (any client reads any image the server can); here such a string
is refused with a 422 that says so, and nothing is ever looked up on disk.
"""

from __future__ import annotations


class PayloadError(ValueError):
    """A request field that cannot be used (HTTP 422); `field` names it, `message` says what was expected."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")
