"""HWC3 conventions, the detect-resolution resize and image reading (unsupported modes refused)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from controlnet.annotate import annotate
from controlnet.annotate.image import detect_size, hwc3, read_image, resize_for_detection


def test_grayscale_becomes_three_equal_channels():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = hwc3(gray)
    assert out.shape == (3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)
    np.testing.assert_array_equal(hwc3(gray[:, :, None]), out)


def test_rgba_is_composited_on_white_like_the_reference():
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [200, 100, 0, 51]]], dtype=np.uint8)
    out = hwc3(rgba)
    assert out[0, 0].tolist() == [10, 20, 30]  # opaque: the colour
    assert out[0, 1].tolist() == [255, 255, 255]  # transparent: white
    assert out[0, 2].tolist() == [244, 224, 204]  # alpha 0.2: 0.2 * colour + 0.8 * 255


def test_gray_alpha_is_composited_too():
    out = hwc3(np.array([[[40, 0], [40, 255]]], dtype=np.uint8))
    assert out.tolist() == [[[255, 255, 255], [40, 40, 40]]]


def test_16_bit_is_scaled_to_8_bit():
    image = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    assert hwc3(image)[0, :, 0].tolist() == [0, 100, 255]


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 5), np.uint8), np.zeros(4, np.uint8)]
)
def test_unsupported_arrays_raise_one_clear_error(bad):
    with pytest.raises(ValueError, match="image"):
        hwc3(bad)


def test_detect_size_follows_the_reference_rounding():
    assert detect_size(400, 600, 512) == (512, 768)  # 400 -> 512, 600 * 1.28 = 768
    assert detect_size(512, 512, 384) == (384, 384)
    assert detect_size(300, 500, 512) == (512, 832)  # 500 * 512/300 = 853.3 -> 13.33 x 64 -> 832
    assert resize_for_detection(np.zeros((300, 500, 3), np.uint8), 512).shape == (512, 832, 3)


def test_detect_size_rejects_sides_that_round_to_zero():
    with pytest.raises(ValueError, match="detect_resolution"):
        detect_size(20, 1000, 16)  # 20 -> 16 px rounds to 0 multiples of 64


def test_read_image_returns_rgb_and_keeps_alpha_and_16_bit(tmp_path):
    red = np.zeros((8, 8, 3), np.uint8)
    red[:, :, 2] = 255  # BGR red on disk
    cv2.imwrite(str(tmp_path / "red.png"), red)
    assert read_image(tmp_path / "red.png")[0, 0].tolist() == [255, 0, 0]

    bgra = np.zeros((8, 8, 4), np.uint8)
    bgra[:, :, 0] = 255  # blue
    bgra[:, :, 3] = 0  # fully transparent
    cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
    rgba = read_image(tmp_path / "rgba.png")
    assert rgba.shape == (8, 8, 4) and rgba[0, 0].tolist() == [0, 0, 255, 0]

    deep = np.full((8, 8), 65535, np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    loaded = read_image(tmp_path / "deep.png")
    assert loaded.dtype == np.uint16 and loaded.shape == (8, 8)


def test_unsupported_modes_are_converted_before_annotating(tmp_path):
    deep = np.zeros((64, 64), np.uint16)
    deep[16:48, 16:48] = 65535  # a white square on black, 16-bit grayscale
    edges = annotate(deep, "canny", detect_resolution=64)
    assert edges.shape == (64, 64, 3)
    assert edges[14:18, 30].max() == 255 and edges[32, 32].max() == 0  # edges on the border, none inside

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48, 3] = 255  # an opaque black square on a transparent (white) background
    edges = annotate(rgba, "canny", detect_resolution=64)
    assert edges[14:18, 30].max() == 255 and edges[2, 2].max() == 0


def test_unreadable_and_missing_files_raise_clear_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")
