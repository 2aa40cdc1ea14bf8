"""KID on the world's own image statistics (evaluate/distribution.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from controlnet.evaluate.distribution import _mmd2_unbiased, kid, world_features
from controlnet.evaluate.heldout import heldout_set


def test_features_are_bounded_and_read_colour_layout_and_edges():
    flat = np.full((32, 32, 3), 200, np.uint8)
    f = world_features(flat)
    assert f.shape == (121,) and f.min() >= 0 and f.max() <= 1
    assert f[:64].sum() == pytest.approx(1) and f[-9:].sum() == pytest.approx(1)
    assert f[-9] == 1  # a flat image: every gradient in the lowest octave
    half = flat.copy()
    half[:, 16:] = 0  # one hard vertical edge
    g = world_features(half)
    assert g[-1] > 0 and g[63] == pytest.approx(0.5)  # the edge in the top octave; half the pixels in the top bin


def test_unbiased_mmd_matches_its_definition_on_a_small_case():
    rng = np.random.default_rng(0)
    x, y = rng.random((4, 3)), rng.random((5, 3))

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(4) for j in range(4) if i != j) / 12
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(a, b) for a in x for b in y) / 20
    assert _mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_near_zero_for_two_draws_of_the_world_and_large_for_damaged_images():
    a = heldout_set("fill", 40).ground_truth
    b = heldout_set("fill", 40, seed=5).ground_truth
    same, spread = kid(a, b)
    assert abs(same) < 3 * spread + 1e-4  # two draws of one distribution: 0 within its scatter
    rng = np.random.default_rng(0)
    noisy = [np.clip(x.astype(int) + rng.integers(-30, 31, x.shape), 0, 255).astype(np.uint8) for x in b]
    other_world = heldout_set("seg", 40).ground_truth
    damaged = kid(a, noisy)[0]
    assert damaged > 10 * max(abs(same), 1e-4)
    assert kid(a, other_world)[0] > max(abs(same), spread)
    blurred = kid(a, [cv2.GaussianBlur(x, (5, 5), 2.0) for x in b])[0]
    assert blurred > same


def test_kid_needs_two_images_per_set():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="expected at least 2 in each set"):
        kid([image], [image, image])
