"""serve/images.py, the one decoder of request images: decoded first, so raw base64 of a JPEG ('/9j/...') is an
image and not a path; a path is never opened, only refused by name. Its errors are typed (ImageTooLarge -> 413,
ImageError -> 422), carry the field, and the app maps them by type, never by their words. io/images.py's PNG
encoders are the one way images leave the server."""

import base64
import io

import pytest
from PIL import Image

from bad_images import bomb_png
from controlnet.errors import ImageError, ImageTooLarge
from controlnet.io.images import png_base64, png_bytes, png_data_uri
from controlnet.serve.images import decode_image
from controlnet.serve.problems import error_status


def _jpeg_base64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_raw_base64_jpeg_is_an_image_in_every_form():
    text = _jpeg_base64()
    assert text.startswith("/9j/")
    assert decode_image(text, "image").size == (8, 6)
    assert decode_image(text.rstrip("="), "image").size == (8, 6)  # padding optional
    assert decode_image("data:image/jpeg;base64," + text, "image").size == (8, 6)
    url_safe = text.replace("+", "-").replace("/", "_")
    assert decode_image(url_safe, "image").size == (8, 6)


def test_null_is_no_image_and_blank_only_where_asked():
    assert decode_image(None, "units[0].image") is None
    assert decode_image("", "init_images[0]", blank_is_none=True) is None  # the web UI's "no image"
    assert decode_image("  ", "mask", blank_is_none=True) is None
    with pytest.raises(ImageError, match="empty value") as info:
        decode_image("", "init_images[0]")
    assert info.value.field == "init_images[0]" and not isinstance(info.value, ImageTooLarge)


@pytest.mark.parametrize("text", ["/etc/passwd", "cond.png", "../secret.png", "C:\\img.png", "~/a.png"])
def test_paths_are_refused_and_never_opened(text):
    with pytest.raises(ImageError, match="file paths are not accepted") as info:
        decode_image(text, "units[0].image")
    assert info.value.field == "units[0].image" and error_status(info.value) == 422


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("!!!not base64!!!", "not valid base64"),
        (base64.b64encode(b"hello, not an image").decode(), "cannot read it as an image"),
        ("data:image/png,abc", "must be base64"),
        (42, "expected a base64 image"),
        ("iVBORw0KGgoAAAANSUhEUgAA", "image"),  # a PNG's first bytes, cut
    ],
)
def test_unreadable_values_are_422_naming_the_field(value, words):
    with pytest.raises(ImageError, match=words) as info:
        decode_image(value, "args[0].image")
    assert type(info.value) is ImageError and info.value.field == "args[0].image"
    assert str(info.value).startswith("args[0].image: ") and error_status(info.value) == 422


def test_too_many_pixels_or_bytes_is_413_naming_the_field():
    bomb = base64.b64encode(bomb_png()).decode()
    with pytest.raises(ImageTooLarge, match="pixels") as info:
        decode_image(bomb, "units[1].image")
    assert info.value.field == "units[1].image" and error_status(info.value) == 413
    small = png_base64(Image.new("RGB", (40, 30)))
    with pytest.raises(ImageTooLarge) as info:
        decode_image(small, "init_image", max_pixels=1000)  # 1200 pixels: a server's own --max-pixels
    assert info.value.field == "init_image" and "1,200 pixels" in str(info.value)
    with pytest.raises(ImageTooLarge, match="over the limit of 10 bytes") as info:
        decode_image(small, "mask", max_bytes=10)
    assert info.value.field == "mask" and error_status(info.value) == 413
    assert decode_image(small, "mask", max_pixels=1200, max_bytes=len(base64.b64decode(small))).size == (40, 30)


def test_status_follows_the_type_not_the_words():
    assert error_status(ImageError("x: 9 pixels, over the limit of 4")) == 422
    assert error_status(ImageTooLarge("x: whatever it says")) == 413
    assert error_status(ValueError("pixels, over the limit")) == 422


def test_one_png_encoder_in_three_spellings():
    image = Image.new("RGB", (5, 4), (1, 2, 3))
    data = png_bytes(image, {"parameters": "a cat\nSteps: 2"})
    assert data.startswith(b"\x89PNG")
    assert base64.b64decode(png_base64(image, {"parameters": "a cat\nSteps: 2"})) == data
    uri = png_data_uri(image)
    assert uri.startswith("data:image/png;base64,")
    decoded = decode_image(uri, "image")
    assert decoded.size == (5, 4) and decoded.getpixel((0, 0)) == (1, 2, 3)
    assert Image.open(io.BytesIO(data)).text["parameters"] == "a cat\nSteps: 2"
