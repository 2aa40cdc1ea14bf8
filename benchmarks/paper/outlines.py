"""Held-out outlines drawn by other code than the world's renderer (PIL's ImageDraw instead of the world's
supersampled OpenCV rasteriser), to test whether a fill ControlNet learned "fill the closed outline" rather than
the renderer's pixels: ellipses of any aspect, rotated squares and triangles, line widths 1-3 px, and half of them
hand-drawn-like (the outline's radius wobbles smoothly by up to 8%, like a hand-drawn line).

`other_outlines(n, size, seed)` -> (prompts, conditions): prompts in the fill form "<colour> <shape> with <colour>
background" with two different named colours, conditions (H, W, 3) uint8 white outlines on black.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from controlnet.world.fill import COLOURS

SHAPES = ("circle", "square", "triangle")
VERTICES = {"circle": 64, "square": 4, "triangle": 3}
OTHER_SEED = 7_000_001


def _polygon(shape: str, rng: np.random.Generator, size: int, wobble: bool) -> list[tuple[float, float]]:
    radius = rng.uniform(0.15, 0.38) * size
    cx, cy = (rng.uniform(radius + 3, size - radius - 3) for _ in range(2))
    turn = rng.uniform(0, 2 * math.pi)
    aspect = rng.uniform(0.75, 1.3) if shape == "circle" else 1.0
    corners = VERTICES[shape]
    # straight sides are sampled densely so that a wobble bends them, as a hand would
    steps = 64 if shape == "circle" or not wobble else corners * 16
    phases, amps = rng.uniform(0, 2 * math.pi, 3), rng.uniform(0.0, 0.08 / 3, 3) if wobble else np.zeros(3)
    points = []
    for k in range(steps):
        t = k / steps
        if shape == "circle":
            angle = 2 * math.pi * t
            x, y = math.cos(angle) * aspect, math.sin(angle)
        else:  # along the polygon's sides
            side, f = divmod(t * corners, 1.0)
            a0, a1 = (2 * math.pi * (side + d) / corners for d in (0, 1))
            x = (1 - f) * math.cos(a0) + f * math.cos(a1)
            y = (1 - f) * math.sin(a0) + f * math.sin(a1)
        r = 1 + sum(
            a * math.sin((j + 2) * 2 * math.pi * t + p) for j, (a, p) in enumerate(zip(amps, phases, strict=True))
        )
        xr, yr = x * math.cos(turn) - y * math.sin(turn), x * math.sin(turn) + y * math.cos(turn)
        points.append((cx + radius * r * xr, cy + radius * r * yr))
    return points


def other_outlines(n: int, size: int = 64, seed: int = OTHER_SEED) -> tuple[list[str], list[np.ndarray]]:
    prompts, conditions = [], []
    names = list(COLOURS)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        shape = SHAPES[i % len(SHAPES)]
        width = int(rng.integers(1, 4))
        points = _polygon(shape, rng, size, wobble=i % 2 == 1)
        image = Image.new("RGB", (size, size), "black")
        ImageDraw.Draw(image).line([*points, points[0]], fill="white", width=width, joint="curve")
        colour, background = rng.choice(len(names), size=2, replace=False)
        prompts.append(f"{names[colour]} {shape} with {names[background]} background")
        conditions.append(np.asarray(image))
    return prompts, conditions
