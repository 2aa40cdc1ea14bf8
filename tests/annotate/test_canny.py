"""Canny parity with controlnet_aux's CannyDetector on real photographs (the maps released ControlNets expect)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data

from controlnet.annotate import get_annotator
from controlnet.annotate.canny import Canny

from .reference import load_aux_module

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]
SETTINGS = [(100, 200, 512), (50, 150, 384), (10, 60, 640)]  # (low, high, detect resolution)


@pytest.fixture(scope="module")
def aux_canny():
    load_aux_module("util.py")
    return load_aux_module("canny/__init__.py").CannyDetector()


@pytest.mark.parametrize("photo", PHOTOS)
@pytest.mark.parametrize(("low", "high", "resolution"), SETTINGS)
def test_canny_equals_controlnet_aux_at_detect_resolution(aux_canny, photo, low, high, resolution):
    image = getattr(skimage.data, photo)()
    expected = aux_canny(image, low, high, detect_resolution=resolution, image_resolution=resolution)
    ours = Canny(low_threshold=low, high_threshold=high, detect_resolution=resolution).detect_map(image)
    assert ours.dtype == np.uint8
    assert ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)
    assert (ours > 0).mean() > 0.01  # a real edge map, not an empty one that trivially matches


def test_canny_full_size_output_is_reference_map_resized_back(aux_canny):
    image = skimage.data.coffee()  # (400, 600, 3): detect size 512x768 differs from the input size
    reference = aux_canny(image, 100, 200, detect_resolution=512, image_resolution=512)
    expected = cv2.resize(reference, (600, 400), interpolation=cv2.INTER_LINEAR)
    ours = get_annotator("canny")(image)
    assert ours.shape == (400, 600, 3)
    np.testing.assert_array_equal(ours, expected)


def test_canny_on_square_512_photo_matches_reference_call_exactly(aux_canny):
    image = skimage.data.astronaut()  # 512x512: detect size == input size
    np.testing.assert_array_equal(get_annotator("canny")(image), aux_canny(image))


def test_canny_rejects_inverted_thresholds():
    with pytest.raises(ValueError, match="high_threshold"):
        Canny(low_threshold=200, high_threshold=100)
