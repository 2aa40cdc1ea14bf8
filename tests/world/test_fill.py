import itertools

import numpy as np
import pytest

from controlnet.world.fill import COLOURS, SHAPES, fill_sample


def test_colours_are_well_separated():
    assert 8 <= len(COLOURS) <= 10
    for a, b in itertools.combinations(COLOURS.values(), 2):
        assert np.linalg.norm(np.subtract(a, b)) >= 100


@pytest.mark.parametrize("shape", SHAPES)
def test_fill_sample_is_deterministic_and_consistent(shape):
    a, b = fill_sample(7, 64, shape), fill_sample(7, 64, shape)
    assert np.array_equal(a.image, b.image) and a.prompt == b.prompt
    assert np.array_equal(a.conditions["fill"], b.conditions["fill"])
    words = a.prompt.split()
    assert words[1] == shape and words[2:] == ["with", words[3], "background"]
    colour, background = words[0], words[3]
    assert colour != background and colour in COLOURS and background in COLOURS
    mask = a.truth["mask"]
    # inside the mask (away from the anti-aliased edge) the image is the named colour, outside the background
    inner = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    outer = ~mask & ~np.roll(mask, 1, 0) & ~np.roll(mask, -1, 0) & ~np.roll(mask, 1, 1) & ~np.roll(mask, -1, 1)
    assert inner.sum() > 10
    assert np.all(a.image[inner] == COLOURS[colour]) and np.all(a.image[outer] == COLOURS[background])
    # the outline is white on black and lies on the mask's border
    source = a.conditions["fill"]
    outline = source[..., 0] > 0
    assert set(np.unique(source)) == {0, 255}
    assert np.array_equal(outline, mask & ~inner)  # 1 px at 64 px: exactly the mask pixels touching outside


def test_circle_mask_matches_geometry():
    s = fill_sample(3, 64, "circle")
    cx, cy = s.info["centre"]
    r = s.info["radius"]
    ys, xs = np.mgrid[:64, :64] + 0.5
    expected = (xs - cx) ** 2 + (ys - cy) ** 2 <= r**2
    disagreement = np.mean(expected != s.truth["mask"])
    assert disagreement < 0.01
    assert abs(s.truth["mask"].sum() - np.pi * r**2) < 2 * np.pi * r  # within one perimeter of the true area


def test_radius_and_colours_vary_across_seeds():
    samples = [fill_sample(seed) for seed in range(200)]
    radii = [s.info["radius"] for s in samples]
    assert max(radii) / min(radii) > 3
    assert len({s.prompt.split()[0] for s in samples}) == len(COLOURS)
    assert len({s.prompt for s in samples}) > 40


def test_shape_word_changes_the_shape():
    circle, square, triangle = (fill_sample(11, 64, shape).truth["mask"] for shape in SHAPES)
    areas = [m.sum() for m in (circle, square, triangle)]
    # same circumradius: circle area pi r^2 > square 2 r^2 > triangle 1.3 r^2
    assert areas[0] > areas[1] > areas[2]


@pytest.mark.parametrize(("kwargs", "word"), [({"shape": "hexagon"}, "shape"), ({"size": 4}, "size")])
def test_bad_arguments_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        fill_sample(0, **kwargs)


def test_varied_outlines_enclose_exactly_the_filled_shape():
    """The "shapes" task: the region the outline encloses (as the metric finds it) is the filled mask, for every
    shape, line width and wobble, and the target's colours sit inside and outside it."""
    from controlnet.evaluate.common import iou
    from controlnet.evaluate.fill import region_from_outline
    from controlnet.world.fill import COLOURS, varied_fill_sample

    shapes, widths = set(), set()
    for seed in range(60):
        s = varied_fill_sample(seed, 64)
        region = region_from_outline(s.conditions["fill"])
        assert iou(region, s.truth["mask"]) == 1.0, seed
        assert s.prompt.split()[1] == s.info["shape"]
        inside = s.image[s.truth["mask"]].astype(int)
        assert (abs(inside - COLOURS[s.info["colour"]]).max(axis=1) < 60).mean() > 0.8
        shapes.add(s.info["shape"])
        widths.add(s.info["line_width"])
        again = varied_fill_sample(seed, 64)
        assert np.array_equal(again.conditions["fill"], s.conditions["fill"])
    assert shapes == {"circle", "square", "triangle"} and widths == {1, 2, 3}


def test_varied_outlines_are_rotated_and_stretched():
    from controlnet.world.fill import varied_fill_sample

    # upright squares in "fill" have their bounding box filled at 50% (a diamond); rotated ones vary
    fractions = []
    for seed in range(40):
        s = varied_fill_sample(seed, 96)
        if s.info["shape"] == "square":
            ys, xs = np.nonzero(s.truth["mask"])
            box = (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
            fractions.append(s.truth["mask"].sum() / box)
    assert len(fractions) >= 5 and max(fractions) - min(fractions) > 0.2
