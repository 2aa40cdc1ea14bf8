"""`controlnet.io.images`: images too large to be real are refused from the header, before any pixel is
decoded; truncated, corrupt and non-image files are one ImageError naming the file; good files decode as PIL does."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
from PIL import Image

from bad_images import BOMB_SIDE, bomb_png, encoded, noise_image, truncated
from controlnet.errors import ControlNetError, ImageError
from controlnet.io.images import MAX_IMAGE_PIXELS, check_pixels, image_size, open_image

LIMIT_SIDE = 8192  # 8192 x 8192 == MAX_IMAGE_PIXELS
MAX_HEADER_BYTES = 8 * 2**20  # reading a header may allocate a little; decoding the bomb would take 3.6 GB


def test_the_limit_is_64_megapixels_and_below_pils_own_warning():
    assert MAX_IMAGE_PIXELS == LIMIT_SIDE * LIMIT_SIDE == 64 * 2**20
    assert MAX_IMAGE_PIXELS < Image.MAX_IMAGE_PIXELS  # PIL never warns about an image we let through
    assert issubclass(ImageError, ControlNetError) and issubclass(ImageError, ValueError)  # the CLI: one line


@pytest.mark.parametrize("as_path", [True, False])
def test_a_bomb_is_refused_from_its_header_without_decoding(tmp_path, as_path):
    data = bomb_png()
    assert len(data) < 2_000  # a few hundred bytes claiming 3.6 gigapixels
    source = tmp_path / "bomb.png" if as_path else data
    if as_path:
        source.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as err:
            open_image(source, "input image")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert f"{BOMB_SIDE * BOMB_SIDE:,} pixels" in message and f"limit of {MAX_IMAGE_PIXELS:,}" in message
    assert ("bomb.png" in message) == as_path and message.startswith("input image")
    assert "\n" not in message
    assert peak < MAX_HEADER_BYTES


@pytest.mark.parametrize("side", [LIMIT_SIDE + 1, 12000])  # under PIL's warning threshold, and between its two
def test_over_the_limit_names_width_and_height_and_no_pil_warning_leaks(side):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match=f"{side}x{side} = {side * side:,} pixels"):
            open_image(bomb_png(side, side))
        with pytest.raises(ImageError, match="over the limit"):
            image_size(bomb_png(side, side))
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_exactly_the_limit_passes_the_header_check_and_max_pixels_is_a_parameter():
    assert image_size(bomb_png(LIMIT_SIDE, LIMIT_SIDE)) == (LIMIT_SIDE, LIMIT_SIDE)
    small = encoded(noise_image(64))
    assert image_size(small, max_pixels=64 * 64) == (64, 64)
    with pytest.raises(ImageError, match="64x64 = 4,096 pixels, over the limit of 4,095"):
        open_image(small, max_pixels=64 * 64 - 1)  # a server can pass a stricter limit
    with pytest.raises(ImageError, match="upload: 3x2 = 6 pixels"):
        check_pixels(3, 2, "upload", max_pixels=5)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_one_line_naming_the_file(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(truncated(fmt))
    assert image_size(path) == (64, 64)  # the header is intact: only decoding finds the cut
    with pytest.raises(ImageError) as err:
        open_image(path, "condition image")
    message = str(err.value)
    assert message.startswith(f"condition image {path}: cannot read it, the file is truncated or corrupt")
    assert "\n" not in message


def test_not_an_image_and_missing_files(tmp_path):
    (tmp_path / "notes.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match=r"mask .*notes.png: cannot read it as an image"):
        open_image(tmp_path / "notes.png", "mask")
    with pytest.raises(ImageError, match="^image: cannot read it as an image"):
        open_image(b"")
    with pytest.raises(FileNotFoundError, match="init image not found: .*missing.png"):
        open_image(tmp_path / "missing.png", "init image")
    with pytest.raises(FileNotFoundError, match="not found"):
        image_size(tmp_path, "input image")  # a folder is not an image file


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "I;16", "P"])
def test_good_files_decode_exactly_as_pil_does_and_keep_their_mode(tmp_path, mode):
    rgb = noise_image(32, seed=4)
    image = rgb.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)
    path = tmp_path / "good.png"
    image.save(path)
    with Image.open(path) as reference:
        expected_mode, expected = reference.mode, np.asarray(reference).copy()
    for source in (path, path.read_bytes()):
        opened = open_image(source)
        assert opened.mode == expected_mode
        np.testing.assert_array_equal(np.asarray(opened), expected)  # decoded, usable after the file is closed
