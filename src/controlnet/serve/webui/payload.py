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


MAX_DEPTH = (
    32  # nesting of a web-UI body; the deepest real one (a unit's {"image": {"image": ..., "mask": ...}}) is 6
)


def check_body(value, where: str = "body", depth: int = 0) -> None:
    """Refuse, before any work, what would fail only once the job has run: nesting deeper than MAX_DEPTH (a
    500-deep list ran the job, then failed to serialise the echoed parameters) and text that is not Unicode (a
    lone surrogate in the prompt reached the tokenizer and was a 500)."""
    if depth > MAX_DEPTH:
        raise PayloadError(
            where, f"nested more than {MAX_DEPTH} levels deep; expected the web UI's request shapes"
        )
    if isinstance(value, str):
        if value.isascii():  # base64 images: megabytes, checked at C speed
            return
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise PayloadError(
                where, f"not valid Unicode text (a lone surrogate at character {err.start})"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_body(key, f"{where} key", depth + 1)
            check_body(item, key if where == "body" else f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for k, item in enumerate(value):
            check_body(item, f"{where}[{k}]", depth + 1)
