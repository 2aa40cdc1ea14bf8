"""Is the built-in base a real text-to-image model? The model card's two numbers, reproducibly.

Colour test: for fill-task prompts "<colour> <shape> with <colour> background", map every output
pixel to its nearest named colour; the sample passes when the two most frequent names are the prompt's two
colours. We also report the stricter "placement" score: the border's majority colour is the background colour.
Shape test: the same colour pair and seed rendered with each shape word; the foreground (pixels not of the
border's colour, largest connected component) is classified by how much of its bounding box it fills
(triangle ~0.5, circle ~0.785, square ~1.0); the score is the fraction classified as the prompted shape.
Both tests are run on the ground-truth renderings too (the ceiling of the measurement itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from controlnet.world.fill import COLOURS, SHAPES, fill_sample

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
PALETTE = np.array([COLOURS[name] for name in COLOUR_NAMES], np.float32)  # (K, 3)
# bounding-box fill ratios of the upright shapes: triangle 0.5, circle pi/4, square 1; decide at the midpoints
TRIANGLE_CIRCLE_SPLIT = (0.5 + np.pi / 4) / 2
CIRCLE_SQUARE_SPLIT = (np.pi / 4 + 1.0) / 2
MIN_FOREGROUND_PIXELS = 6  # fewer foreground pixels than this: no shape at all


def nearest_colour_map(image: np.ndarray) -> np.ndarray:
    """(H, W) int index into COLOUR_NAMES of each pixel's nearest named colour (Euclidean RGB)."""
    pixels = image.reshape(-1, 1, 3).astype(np.float32)  # (HW, 1, 3)
    distance = ((pixels - PALETTE[None]) ** 2).sum(-1)  # (HW, K)
    return distance.argmin(-1).reshape(image.shape[:2])


def dominant_colours(image: np.ndarray, k: int = 2) -> list[str]:
    """The k most frequent nearest named colours, most frequent first."""
    counts = np.bincount(nearest_colour_map(image).ravel(), minlength=len(COLOUR_NAMES))
    return [COLOUR_NAMES[i] for i in np.argsort(-counts, kind="stable")[:k]]


def border_colour(labels: np.ndarray) -> int:
    """Majority colour index on the one-pixel image border."""
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return int(np.bincount(border, minlength=len(COLOUR_NAMES)).argmax())


def classify_shape(image: np.ndarray) -> str:
    """ "circle", "square", "triangle" or "none" for one image of a shape on a plain background."""
    labels = nearest_colour_map(image)
    foreground = (labels != border_colour(labels)).astype(np.uint8)  # (H, W)
    count, components, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    if count < 2:
        return "none"
    largest = 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())
    area = stats[largest, cv2.CC_STAT_AREA]
    if area < MIN_FOREGROUND_PIXELS:
        return "none"
    box = stats[largest, cv2.CC_STAT_WIDTH] * stats[largest, cv2.CC_STAT_HEIGHT]
    ratio = area / box
    if ratio < TRIANGLE_CIRCLE_SPLIT:
        return "triangle"
    return "circle" if ratio < CIRCLE_SQUARE_SPLIT else "square"


@dataclass
class QualityReport:
    """Scores in [0, 1] of the model and of the ground-truth images through the same tests."""

    colour_pairs: float
    """fraction whose two dominant named colours are the prompt's two colours (the shipped base must reach 0.9)"""
    colour_placement: float
    """fraction whose border colour is the prompt's background colour and whose other dominant colour is the shape's"""
    shape: float
    """fraction of shape-test images classified as the prompted shape (chance: 1/3)"""
    shape_confusion: dict[str, dict[str, int]]
    """prompted shape -> classified shape -> count"""
    truth_colour_pairs: float
    truth_colour_placement: float
    truth_shape: float
    n_colour: int
    n_shape: int

    def table(self) -> str:
        rows = [
            ("colour pairs (2 dominant = prompt's 2)", self.colour_pairs, self.truth_colour_pairs, self.n_colour),
            (
                "colour placement (border = background)",
                self.colour_placement,
                self.truth_colour_placement,
                self.n_colour,
            ),
            ("shape word -> classified shape", self.shape, self.truth_shape, self.n_shape),
        ]
        lines = [f"{'test':42s} {'model':>7s} {'truth':>7s} {'n':>5s}"]
        lines += [f"{name:42s} {model:7.3f} {truth:7.3f} {n:5d}" for name, model, truth, n in rows]
        lines.append("shape confusion (prompted -> classified): " + str(self.shape_confusion))
        return "\n".join(lines)


def colour_scores(images: Sequence[np.ndarray], pairs: Sequence[tuple[str, str]]) -> tuple[float, float]:
    """(pair score, placement score) of images for (shape colour, background colour) pairs."""
    pair_ok = placement_ok = 0
    for image, (colour, background) in zip(images, pairs, strict=True):
        top = dominant_colours(image)
        pair_ok += set(top) == {colour, background}
        labels = nearest_colour_map(image)
        placement_ok += COLOUR_NAMES[border_colour(labels)] == background and set(top) == {colour, background}
    return pair_ok / len(images), placement_ok / len(images)


def quality_prompts(n: int, seed: int, size: int, shapes: Sequence[str] = SHAPES) -> list:
    """n fill samples with shapes cycling through `shapes`, deterministic by seed."""
    return [fill_sample(seed * 1_000_003 + i, size=size, shape=shapes[i % len(shapes)]) for i in range(n)]


def measure_quality(
    generate: Callable[[list[str], int], list[np.ndarray]],
    size: int,
    n_colour: int = 200,
    n_shape_pairs: int = 40,
    seed: int = 0,
) -> QualityReport:
    """Run both tests. `generate(prompts, seed)` returns one (H, W, 3) uint8 image per prompt."""
    truth = quality_prompts(n_colour, seed, size)
    pairs = [(s.info["colour"], s.info["background"]) for s in truth]
    images = generate([s.prompt for s in truth], seed)
    colour_pairs, placement = colour_scores(images, pairs)
    truth_pairs, truth_placement = colour_scores([s.image for s in truth], pairs)

    confusion = {shape: {other: 0 for other in (*SHAPES, "none")} for shape in SHAPES}
    shape_ok = truth_ok = 0
    shape_seeds = [(seed + 1) * 1_000_003 + i for i in range(n_shape_pairs)]
    for shape in SHAPES:
        # the same seeds give the same colours, centre and size for every shape word
        renderings = [fill_sample(s, size=size, shape=shape) for s in shape_seeds]
        for image in generate([r.prompt for r in renderings], seed + 1):  # same noise for every shape word
            guess = classify_shape(image)
            confusion[shape][guess] += 1
            shape_ok += guess == shape
        truth_ok += sum(classify_shape(r.image) == shape for r in renderings)
    n_shape = n_shape_pairs * len(SHAPES)
    return QualityReport(
        colour_pairs=colour_pairs,
        colour_placement=placement,
        shape=shape_ok / n_shape,
        shape_confusion=confusion,
        truth_colour_pairs=truth_pairs,
        truth_colour_placement=truth_placement,
        truth_shape=truth_ok / n_shape,
        n_colour=n_colour,
        n_shape=n_shape,
    )
