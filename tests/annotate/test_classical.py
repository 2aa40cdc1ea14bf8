"""Property tests of the weight-free annotators on real photographs and synthetic scenes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data

from controlnet.annotate import annotate, get_annotator, list_annotators
from controlnet.annotate.inpaint import masked_condition
from controlnet.annotate.lines import Lines
from controlnet.annotate.normal import normals_from_depth

from .reference import load_aux_module

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]


def photo(name: str) -> np.ndarray:
    return getattr(skimage.data, name)()


# ---- lineart_standard: exact parity with controlnet_aux's LineartStandardDetector ----


@pytest.mark.parametrize("name", PHOTOS)
def test_lineart_standard_equals_controlnet_aux(name):
    load_aux_module("util.py")
    reference = load_aux_module("lineart_standard/__init__.py").LineartStandardDetector()
    image = photo(name)
    expected = reference(image, detect_resolution=512, output_type="np")
    ours = annotate(image, "lineart_standard")
    assert ours.shape == image.shape
    np.testing.assert_array_equal(ours, expected)
    assert ours.max() > 100


# ---- lines: straight segments only, and the straight edges of a scene are found ----


def distance_to_segments(points: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """(P, 2) xy points, (N, 4) segments -> (P,) distance to the nearest segment."""
    a, b = segments[None, :, :2], segments[None, :, 2:]  # (1, N, 2)
    p = points[:, None, :]  # (P, 1, 2)
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9), 0, 1)  # (P, N)
    closest = a + t[..., None] * ab
    return np.sqrt(((p - closest) ** 2).sum(-1)).min(axis=1)


@pytest.mark.parametrize("method", ["lsd", "hough"])
@pytest.mark.parametrize("name", ["astronaut", "rocket"])
def test_line_map_is_made_of_long_straight_segments(name, method):
    lines = Lines(method=method)
    image = cv2.resize(photo(name), (512, 512), interpolation=cv2.INTER_AREA)  # detect size == input size
    segments = lines.segments(image)
    line_map = lines(image)
    assert len(segments) > 10
    lengths = np.hypot(segments[:, 2] - segments[:, 0], segments[:, 3] - segments[:, 1])
    assert lengths.min() >= 20.0
    lit = np.argwhere(line_map[:, :, 0] > 0)[:, ::-1].astype(np.float32)  # (P, 2) as x, y
    assert set(np.unique(line_map)) == {0, 255}
    # Every lit pixel lies on one of the straight segments (1-px lines between the truncated endpoints):
    # a rasterised line strays at most half a pixel diagonal from its ideal segment.
    assert distance_to_segments(lit, np.trunc(segments)).max() <= 0.75


@pytest.mark.parametrize("method", ["lsd", "hough"])
def test_lines_trace_the_sides_of_a_rectangle_and_ignore_flat_regions(method):
    image = np.full((256, 256, 3), 255, np.uint8)
    image[64:192, 48:208] = (40, 40, 40)  # dark rectangle, sides at x = 48/207 and y = 64/191
    line_map = annotate(image, "lines", method=method, detect_resolution=256)[:, :, 0]
    for side in (line_map[60:68, 70:190], line_map[188:196, 70:190]):  # top and bottom sides
        assert (side.max(axis=0) > 0).mean() > 0.9
    for side in (line_map[80:176, 44:52], line_map[80:176, 204:212]):  # left and right sides
        assert (side.max(axis=1) > 0).mean() > 0.9
    assert line_map[90:166, 70:186].max() == 0 and line_map[:40].max() == 0


# ---- scribble: binary, thick, simplified, following the photo's strong edges ----


@pytest.mark.parametrize("name", PHOTOS)
def test_scribble_is_binary_thick_and_follows_edges(name):
    image = photo(name)
    scribble = annotate(image, "scribble")
    assert scribble.shape == image.shape
    assert set(np.unique(scribble)) == {0, 255}
    assert 0.01 < (scribble > 0).mean() < 0.5
    # Thick: at the detect resolution, every stroke pixel belongs to a fully lit 3x3 block, i.e. a
    # morphological opening with a 3x3 square leaves the map unchanged (no 1-px lines).
    at_detect = get_annotator("scribble").detect_map(image)[:, :, 0]
    np.testing.assert_array_equal(
        cv2.morphologyEx(at_detect, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)), at_detect
    )


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])  # rocket: a dark dusk scene, few XDoG strokes
def test_scribble_follows_the_strong_edges_of_the_photo(name):
    image = photo(name)
    scribble = annotate(image, "scribble")
    edges = cv2.Canny(image, 200, 400) > 0
    near_stroke = cv2.dilate(scribble[:, :, 0], np.ones((7, 7), np.uint8)) > 0  # within 3 px of a stroke
    assert near_stroke[edges].mean() > 0.5


def test_scribble_drops_specks_and_keeps_strokes():
    image = np.full((256, 256, 3), 255, np.uint8)
    image[100:102, 30:32] = 0  # a 2x2 speck
    cv2.line(image, (60, 200), (220, 200), (0, 0, 0), 2)  # a stroke
    scribble = annotate(image, "scribble", detect_resolution=256)[:, :, 0]
    assert scribble[90:112, 20:42].max() == 0
    assert (scribble[195:206, 70:210].max(axis=0) == 255).all()


# ---- soft edge: graded, peaks on boundaries, dark in flat regions ----


def test_softedge_peaks_on_a_step_and_is_dark_on_flat_regions():
    image = np.zeros((128, 128, 3), np.uint8)
    image[:, 64:] = 200  # vertical step between columns 63 and 64
    soft = annotate(image, "softedge", detect_resolution=128)[:, :, 0]
    profile = soft[64].astype(int)
    assert profile.argmax() in (63, 64)
    assert profile[63] == 255 or profile[64] == 255
    assert profile[:40].max() == 0 and profile[90:].max() == 0  # 3 x the largest sigma away: nothing
    assert 0 < profile[56] < 255  # a soft, graded falloff rather than a binary line


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_softedge_on_photos_is_graded(name):
    soft = annotate(photo(name), "softedge")
    assert len(np.unique(soft)) > 100
    assert 0.005 < (soft == 255).mean() < 0.05  # only the ~1% strongest responses saturate


# ---- normals from depth: unit length, and the direction the depth implies ----


def decode(normal_map: np.ndarray) -> np.ndarray:
    return (normal_map.astype(np.float64) - 127.5) / 127.5


def test_normal_of_a_tilted_plane_matches_the_hand_computed_normal():
    rows, cols = np.mgrid[0:128, 0:128]
    depth = (0.5 * cols + 0.25 * rows + 50).astype(np.float32)  # near = bright, rising right and down
    # Sobel(3) of the ramp: (8 * 0.5, 8 * 0.25) = (4, 2); with a = 2 pi the unit normal is
    # (4, 2, 6.2832) / 7.7122 = (0.5187, 0.2593, 0.8147) -> x * 127.5 + 127.5 = (193.6, 160.6, 231.4).
    normal = normals_from_depth(depth)
    np.testing.assert_allclose(normal[64, 64], [0.5187, 0.2593, 0.8147], atol=1e-3)
    normal_map = get_annotator("normal", detect_resolution=None)(np.dstack([depth.astype(np.uint8)] * 3))
    assert normal_map[64, 64].tolist() == [193, 160, 231]
    bgr = get_annotator("normal", detect_resolution=None, channel_order="bgr")(
        np.dstack([depth.astype(np.uint8)] * 3)
    )
    assert bgr[64, 64].tolist() == [231, 160, 193]


def test_normals_of_a_dome_are_unit_length_and_face_away_from_its_centre():
    rows, cols = np.mgrid[0:256, 0:256].astype(np.float64)
    radius = 100.0
    r2 = (cols - 128) ** 2 + (rows - 128) ** 2
    depth = np.where(r2 < radius**2, np.sqrt(np.maximum(radius**2 - r2, 0)) * 2.0, 0).astype(
        np.uint8
    )  # (256, 256)
    normal_map = annotate(depth, "normal", detect_resolution=256)
    n = decode(normal_map)
    assert np.abs(np.linalg.norm(n, axis=2) - 1).max() < 0.02  # unit length up to 8-bit quantisation
    # Channels are (left, up, front): the right flank faces right, the upper flank faces up.
    assert n[128, 200, 0] < -0.3 and n[128, 56, 0] > 0.3
    assert n[56, 128, 1] > 0.3 and n[200, 128, 1] < -0.3
    assert n[128, 128, 2] > 0.95
    assert normal_map[5, 5].tolist() == [127, 127, 255]  # background (depth below 10%) faces the camera


def test_normals_are_consistent_with_the_depth_gradient_on_a_photo_depth():
    depth = cv2.GaussianBlur(cv2.cvtColor(photo("coffee"), cv2.COLOR_RGB2GRAY), (0, 0), 4).astype(np.float32)
    normal = normals_from_depth(depth, background_threshold=0.0)
    gx = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    # n is parallel to (gx, gy, 2 pi): n_x / n_z and n_y / n_z give the depth gradient back.
    np.testing.assert_allclose(normal[..., 0] / normal[..., 2], gx / (2 * np.pi), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(normal[..., 1] / normal[..., 2], gy / (2 * np.pi), rtol=1e-4, atol=1e-4)


# ---- shuffle, tile, inpaint, invert ----


def quadrants() -> np.ndarray:
    image = np.zeros((256, 256, 3), np.uint8)
    image[:128, :128] = (255, 0, 0)
    image[:128, 128:] = (0, 255, 0)
    image[128:, :128] = (0, 0, 255)
    image[128:, 128:] = (255, 255, 0)
    return image


def test_shuffle_keeps_colours_scrambles_layout_and_is_seeded():
    image = quadrants()
    shuffled = annotate(image, "shuffle", seed=3, detect_resolution=256)
    np.testing.assert_array_equal(shuffled, annotate(image, "shuffle", seed=3, detect_resolution=256))
    assert not np.array_equal(shuffled, annotate(image, "shuffle", seed=4, detect_resolution=256))
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    exact = np.array([tuple(p) in colours for p in shuffled.reshape(-1, 3)])
    assert exact.mean() > 0.8  # pixels are sampled from the input, so they keep its colours
    assert (shuffled != image).any(axis=2).mean() > 0.3  # but not where they were


def test_tile_removes_detail_and_keeps_the_picture():
    image = photo("astronaut")
    np.testing.assert_array_equal(annotate(image, "tile", down_sampling_rate=1.0), image)
    tile = annotate(image, "tile", down_sampling_rate=4.0)
    assert tile.shape == image.shape

    def detail(x):
        return cv2.Laplacian(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()

    assert detail(tile) < 0.25 * detail(image)
    assert np.abs(tile.astype(float).mean(axis=(0, 1)) - image.astype(float).mean(axis=(0, 1))).max() < 2
    assert np.corrcoef(tile.ravel(), image.ravel())[0, 1] > 0.9


def test_inpaint_mask_from_alpha_and_from_a_painted_mask():
    rgba = np.full((64, 64, 4), 255, np.uint8)
    rgba[10:20, 30:40, 3] = 0  # transparent hole = repaint
    mask = annotate(rgba, "inpaint")
    assert mask.shape == (64, 64, 3)
    assert (mask[10:20, 30:40] == 255).all() and mask.sum() == 255 * 3 * 100
    painted = np.zeros((64, 64), np.uint8)
    painted[0:5, 0:5] = 200
    mask = annotate(painted, "inpaint")
    assert (mask[0:5, 0:5] == 255).all() and mask.sum() == 255 * 3 * 25
    condition = masked_condition(np.full((64, 64, 3), 51, np.uint8), mask)
    assert condition[0, 0].tolist() == [-1.0, -1.0, -1.0]
    np.testing.assert_allclose(condition[10, 10], [0.2, 0.2, 0.2])


def test_invert_is_the_negative():
    image = photo("coffee")
    inverted = annotate(image, "invert")
    np.testing.assert_array_equal(inverted.astype(int) + image, np.full(image.shape, 255))
    np.testing.assert_array_equal(annotate(inverted, "invert"), image)


# ---- every classical annotator: shape/dtype contract and option validation ----

CLASSICAL = [
    "canny",
    "lines",
    "scribble",
    "softedge",
    "lineart_standard",
    "normal",
    "shuffle",
    "tile",
    "inpaint",
    "invert",
]


@pytest.mark.parametrize("name", CLASSICAL)
def test_contract_hwc_uint8_at_the_input_size(name):
    assert name in list_annotators()
    image = photo("chelsea")[:293, :447]  # odd size: not a multiple of 64
    out = annotate(image, name)
    assert out.dtype == np.uint8 and out.shape == (293, 447, 3)


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="detect_resolution"):
        get_annotator("canny", detect_resolution=10)
    with pytest.raises(ValueError, match="method"):
        get_annotator("lines", method="mlsd")
    with pytest.raises(ValueError, match="unknown option"):
        get_annotator("scribble", sigma=3)
    with pytest.raises(ValueError, match="unknown name"):
        get_annotator("magic")


def test_normals_from_16_bit_depth_keep_its_precision():
    cols = np.tile(np.arange(128, dtype=np.float64), (128, 1))
    depth16 = np.round(cols * 257 * 0.4 + 257 * 20).astype(np.uint16)  # a ramp of 0.4 grey levels per pixel
    normal_map = annotate(depth16, "normal", detect_resolution=None, background_threshold=0.0)
    interior = normal_map[4:-4, 4:-4].reshape(-1, 3)
    # Sobel of 0.4 / px = 3.2; |(3.2, 0, 2 pi)| = sqrt(10.24 + 39.478) = 7.0511, so the normal is
    # (0.4538, 0, 0.8911) -> x 127.5 + 127.5 = (185.36, 127.5, 241.11) -> (185, 127, 241).
    assert {tuple(int(v) for v in p) for p in interior} == {(185, 127, 241)}  # one normal: no 8-bit staircase
    quantised = annotate(np.round(depth16 / 257).astype(np.uint8), "normal", detect_resolution=None)
    assert len({tuple(p) for p in quantised[4:-4, 4:-4].reshape(-1, 3)}) > 1  # 8-bit steps: several normals


def test_annotate_reuses_one_annotator_per_name_and_options():
    from controlnet.annotate import cached_annotator

    assert cached_annotator("canny", low_threshold=50) is cached_annotator("canny", low_threshold=50)
    assert cached_annotator("canny", low_threshold=50) is not cached_annotator("canny", low_threshold=60)
    assert cached_annotator("softedge", sigmas=[1.0, 2.0]).sigmas == (1.0, 2.0)  # unhashable: built fresh
