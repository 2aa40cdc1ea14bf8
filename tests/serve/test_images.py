"""serve/images.py, the one decoder of request images: decoded first, so raw base64 of a JPEG ('/9j/...') is an
image and not a path; a path is never opened, only refused by name."""

import base64
import io

import pytest
from PIL import Image

from controlnet.serve.images import decode_image
from controlnet.serve.problems import ApiError
from controlnet.serve.webui.payload import PayloadError
from controlnet.serve.webui.payload import decode_image as webui_decode


def _jpeg_base64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_raw_base64_jpeg_is_an_image_in_every_front_door():
    text = _jpeg_base64()
    assert text.startswith("/9j/")
    assert decode_image(text, "image").size == (8, 6)
    assert decode_image(text.rstrip("="), "image").size == (8, 6)  # padding optional
    assert webui_decode(text, "init_images[0]").size == (8, 6)
    assert webui_decode("", "init_images[0]") is None  # the web UI's "no image"


@pytest.mark.parametrize("text", ["/etc/passwd", "cond.png", "../secret.png", "C:\\img.png", "~/a.png"])
def test_paths_are_refused_and_never_opened(text):
    with pytest.raises(ApiError, match="file paths are not accepted") as info:
        decode_image(text, "units[0].image")
    assert info.value.status == 422 and info.value.field == "units[0].image"
    with pytest.raises(PayloadError, match="file paths are not accepted"):
        webui_decode(text, "args[0].image")
