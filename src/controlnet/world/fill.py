"""The fill50k-style task: an outline of a shape -> the shape filled with a named colour on a named background.

The original ControlNet tutorial trains on "fill50k": a circle outline on black is the condition and the
target is that circle filled with one colour on a background of another, prompt "<colour> circle with
<colour> background". We keep that task (circle is the default) and add square and triangle so that a base
model can learn that the shape word changes the shape.
"""

from __future__ import annotations

import cv2
import numpy as np

from controlnet.world.sample import WorldSample

# Well-separated named colours (RGB); every pair differs by >= 100 in Euclidean RGB distance (tested).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (240, 225, 40),
    "green": (40, 170, 60),
    "cyan": (40, 210, 220),
    "blue": (30, 60, 210),
    "purple": (130, 40, 170),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SHAPE_VERTEX_ANGLES = {"square": [45.0, 135.0, 225.0, 315.0], "triangle": [270.0, 30.0, 150.0]}
FILL_VOCABULARY: tuple[str, ...] = (*COLOURS, *SHAPES, "with", "background")

OUTLINE_VALUE = 255  # the condition's outline is white on black, as fill50k's source images
SUPERSAMPLE = 4  # the target is drawn at 4x and area-averaged: anti-aliased edges like cv2's LINE_AA
SUBPIXEL_BITS = 4  # cv2 drawing with fixed-point coordinates (shift=4: 1/16 px)
MIN_RADIUS_FRACTION = 0.08  # shape "radius" (circumradius) as a fraction of the image side: varies a lot,
MAX_RADIUS_FRACTION = 0.40  # as fill50k's radii do
MIN_SIZE = 16


def fill_prompt(colour: str, shape: str, background: str) -> str:
    """The exact fill50k prompt form: "<colour> <shape> with <colour> background"."""
    return f"{colour} {shape} with {background} background"


def _draw_colours(rng: np.random.Generator) -> tuple[str, str]:
    """Two different named colours (shape, background), the first draws of a sample's generator."""
    names = list(COLOURS)
    colour_index, background_index = rng.choice(len(names), size=2, replace=False)
    return names[colour_index], names[background_index]


def _paint(coverage: np.ndarray, colour: str, background: str) -> np.ndarray:
    """(H, W, 3) uint8: `colour` where coverage (H, W, 1) is 1, `background` where 0, blended between."""
    fg = np.array(COLOURS[colour], np.float32)
    bg = np.array(COLOURS[background], np.float32)
    return np.clip(np.round(coverage * fg + (1.0 - coverage) * bg), 0, 255).astype(np.uint8)


def _shape_polygon(shape: str, centre: np.ndarray, radius: float) -> np.ndarray | None:
    """Vertices (N, 2) in (x, y) pixels of an upright square / triangle with circumradius `radius`; None for a circle."""
    if shape == "circle":
        return None
    # vertex angles in degrees; image y grows downward, so 270 is up (the triangle's apex)
    angles = np.deg2rad(SHAPE_VERTEX_ANGLES[shape])
    return centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _rasterize(shape: str, centre: np.ndarray, radius: float, size: int) -> np.ndarray:
    """Coverage (size, size) float in [0, 1] of the shape, by SUPERSAMPLE x SUPERSAMPLE sampling per pixel."""
    big = size * SUPERSAMPLE
    canvas = np.zeros((big, big), np.uint8)
    scale = SUPERSAMPLE * (1 << SUBPIXEL_BITS)

    def to_big(p) -> np.ndarray:  # pixel centres sit at (i + 0.5): p maps to p * SUPERSAMPLE - 0.5, fixed point
        return np.round((np.asarray(p) * SUPERSAMPLE - 0.5) * (1 << SUBPIXEL_BITS)).astype(np.int32)

    polygon = _shape_polygon(shape, centre, radius)
    if polygon is not None:
        return _rasterize_polygon(polygon, size)
    cv2.circle(
        canvas,
        tuple(int(v) for v in to_big(centre)),
        int(round(radius * scale)),
        255,
        -1,
        cv2.LINE_8,
        SUBPIXEL_BITS,
    )
    coverage = cv2.resize(canvas.astype(np.float32) / 255.0, (size, size), interpolation=cv2.INTER_AREA)
    return coverage  # (size, size)


def outline_from_mask(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Inner boundary (H, W) bool of a filled mask: mask pixels within `thickness` px of the outside."""
    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    eroded = cv2.erode(mask.astype(np.uint8), kernel, iterations=thickness, borderValue=0)
    return mask & (eroded == 0)


def outline_thickness(size: int) -> int:
    """Outline width in px: 1 px at 64-128 px, growing with the image (fill50k at 512 px has ~4 px lines)."""
    return max(1, size // 128)


def fill_sample(seed: int, size: int = 64, shape: str = "circle") -> WorldSample:
    """One fill-task sample, deterministic by `seed`.

    image: the shape filled with one named colour on a background of another (anti-aliased).
    conditions["fill"]: the shape's outline, white on black (fill50k's source).
    truth["mask"]: (H, W) bool, the filled region (coverage >= 0.5); the outline is its inner boundary.
    info: colour, background, shape, centre (x, y) and radius in px.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}: expected one of {', '.join(SHAPES)}")
    if not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size={size!r}: expected an integer >= {MIN_SIZE}")
    rng = np.random.default_rng(seed)
    colour, background = _draw_colours(rng)
    radius = float(rng.uniform(MIN_RADIUS_FRACTION, MAX_RADIUS_FRACTION) * size)
    margin = radius + 1.0
    centre = rng.uniform(margin, size - margin, size=2)  # (2,) x, y

    coverage = _rasterize(shape, centre, radius, size)[..., None]  # (H, W, 1)
    image = _paint(coverage, colour, background)  # (H, W, 3)
    mask = coverage[..., 0] >= 0.5  # (H, W)
    outline = outline_from_mask(mask, outline_thickness(size))
    source = np.zeros((size, size, 3), np.uint8)
    source[outline] = OUTLINE_VALUE
    return WorldSample(
        image=image,
        prompt=fill_prompt(colour, shape, background),
        conditions={"fill": source},
        truth={"mask": mask},
        info={
            "colour": colour,
            "background": background,
            "shape": shape,
            "centre": tuple(centre),
            "radius": radius,
        },
    )


# The "shapes" task: outlines as people and other programs draw them, not only as fill50k renders them. fill50k (and
# the "fill" task) has upright circles with 1 px lines; a net trained on those alone fills ellipses, rotated squares
# and thick or hand-drawn lines poorly (benchmarks/paper/outlines.py). Every shape, any rotation, circles stretched
# into ellipses, lines 1-3 px at 64 px (scaled with the image), and half of the outlines wobbling like a hand's.
ELLIPSE_ASPECT_RANGE = (0.75, 1.3)  # width / height of a stretched circle, before rotation
MAX_LINE_WIDTH_64 = 3  # px at 64 px; outline_thickness(size) * this at larger sizes
WOBBLE_AMPLITUDE = 0.08  # at most 8% of the radius, summed over three smooth waves around the outline
CURVE_POINTS = 96  # vertices of a circle's (and a wobbling side's) polygon: smooth at 4x supersampling


def _varied_polygon(shape: str, centre: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Vertices (N, 2) in (x, y) px of `shape` with circumradius ~`radius`, rotated, maybe stretched and wobbling."""
    turn = rng.uniform(0.0, 2.0 * np.pi)
    aspect = rng.uniform(*ELLIPSE_ASPECT_RANGE) if shape == "circle" else 1.0
    wobble = rng.random() < 0.5
    amplitudes = rng.uniform(0.0, WOBBLE_AMPLITUDE / 3, 3) if wobble else np.zeros(3)
    phases = rng.uniform(0.0, 2.0 * np.pi, 3)
    t = np.arange(CURVE_POINTS) / CURVE_POINTS  # (N,) position around the outline in [0, 1)
    if shape == "circle":
        x, y = np.cos(2 * np.pi * t) * aspect, np.sin(2 * np.pi * t)
    else:  # points along the straight sides, so that a wobble bends them
        corners = np.deg2rad(SHAPE_VERTEX_ANGLES[shape])
        side, f = np.divmod(t * len(corners), 1.0)
        a0, a1 = corners[side.astype(int)], corners[(side.astype(int) + 1) % len(corners)]
        x, y = (1 - f) * np.cos(a0) + f * np.cos(a1), (1 - f) * np.sin(a0) + f * np.sin(a1)
    waves = 1.0 + sum(
        a * np.sin((k + 2) * 2 * np.pi * t + p) for k, (a, p) in enumerate(zip(amplitudes, phases, strict=True))
    )  # (N,) radius factor
    xr, yr = x * np.cos(turn) - y * np.sin(turn), x * np.sin(turn) + y * np.cos(turn)
    return centre + radius * waves[:, None] * np.stack([xr, yr], axis=1)


def varied_fill_sample(seed: int, size: int = 64) -> WorldSample:
    """One "shapes"-task sample, deterministic by `seed`: any of SHAPES, drawn as described above.

    Same fields as `fill_sample`; the outline is still the filled mask's inner boundary (so the region it encloses is
    exactly the filled one), `info` adds the line width and the polygon.
    """
    if not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size={size!r}: expected an integer >= {MIN_SIZE}")
    rng = np.random.default_rng(seed)
    colour, background = _draw_colours(rng)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    radius = float(rng.uniform(MIN_RADIUS_FRACTION, MAX_RADIUS_FRACTION) * size)
    reach = radius * ELLIPSE_ASPECT_RANGE[1] * (1 + WOBBLE_AMPLITUDE)  # the farthest a vertex can be
    margin = min(reach + 1.0, size / 2 - 1.0)
    centre = rng.uniform(margin, size - margin, size=2)  # (2,) x, y
    polygon = _varied_polygon(shape, centre, radius, rng)
    width = int(rng.integers(1, MAX_LINE_WIDTH_64 + 1)) * outline_thickness(size)

    coverage = _rasterize_polygon(polygon, size)[..., None]  # (H, W, 1)
    image = _paint(coverage, colour, background)  # (H, W, 3)
    mask = coverage[..., 0] >= 0.5  # (H, W)
    source = np.zeros((size, size, 3), np.uint8)
    source[outline_from_mask(mask, width)] = OUTLINE_VALUE
    return WorldSample(
        image=image,
        prompt=fill_prompt(colour, shape, background),
        conditions={"fill": source},
        truth={"mask": mask},
        info={
            "colour": colour,
            "background": background,
            "shape": shape,
            "centre": tuple(centre),
            "radius": radius,
            "line_width": width,
            "polygon": polygon.tolist(),
        },
    )


def _rasterize_polygon(polygon: np.ndarray, size: int) -> np.ndarray:
    """Coverage (size, size) float in [0, 1] of a filled polygon (N, 2), by SUPERSAMPLE x SUPERSAMPLE sampling."""
    big = size * SUPERSAMPLE
    canvas = np.zeros((big, big), np.uint8)
    points = np.round((polygon * SUPERSAMPLE - 0.5) * (1 << SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(canvas, [points], 255, cv2.LINE_8, SUBPIXEL_BITS)
    return cv2.resize(canvas.astype(np.float32) / 255.0, (size, size), interpolation=cv2.INTER_AREA)
