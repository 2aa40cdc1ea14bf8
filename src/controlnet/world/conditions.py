"""The seven condition maps of a rendered scene, each (H, W, 3) uint8 in the released ControlNets' convention.

canny    cv2.Canny of the rendered image (low 100, high 200: the annotator's defaults), white on black.
lines    straight edges of the scene geometry that are visible (M-LSD style), 1 px white lines on black.
scribble jittered, thick outlines of every visible object (user scribbles / HED-scribble style).
pose     OpenPose 18-keypoint body map with the standard colours, black background.
seg      ADE20K palette colour of each pixel's class (wall, floor, ball, box, tent, person).
depth    relative inverse depth, min-max normalised, near = bright, grey (MiDaS style).
normal   camera-frame normals, RGB = 255 * (1 + (-nx, ny, nz)) / 2 (see palette.NORMAL_RGB_SIGNS).
"""

from __future__ import annotations

import cv2
import numpy as np

from controlnet.world.palette import ADE20K_CLASSES, NORMAL_RGB_SIGNS
from controlnet.world.pose import draw_openpose
from controlnet.world.raster import Buffers
from controlnet.world.render import FIRST_OBJECT_ID, FLOOR_ID, KIND_CLASS, WALL_ID, Geometry
from controlnet.world.scene import Scene

CONDITIONS: tuple[str, ...] = ("canny", "lines", "scribble", "pose", "seg", "depth", "normal")
CANNY_LOW, CANNY_HIGH = 100, 200  # the Canny annotator's default thresholds
LINE_WIDTH = 1  # the Hough/M-LSD annotator draws 1 px lines
SCRIBBLE_WIDTH_FRACTION = 1 / 40  # stroke width / image side (at least 2 px)
SCRIBBLE_JITTER_FRACTION = 0.015  # amplitude of the hand-drawn wobble / image side
SCRIBBLE_WAVES = 3  # sinusoids summed for the wobble
SCRIBBLE_STREAM = 0x5C  # seeds the scribble's randomness apart from the scene's
SUBPIXEL_BITS = 4  # cv2 fixed-point drawing (1/16 px)


def seg_classes(scene: Scene, ids: np.ndarray) -> np.ndarray:
    """(H, W) int16 ADE20K class index of each pixel, from the object-id map."""
    lookup = [ADE20K_CLASSES["wall"][0], ADE20K_CLASSES["floor"][0]]
    lookup += [ADE20K_CLASSES[KIND_CLASS[obj.kind]][0] for obj in scene.objects]
    assert WALL_ID == 0 and FLOOR_ID == 1 and FIRST_OBJECT_ID == 2
    return np.asarray(lookup, np.int16)[ids]


def seg_map(scene: Scene, ids: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 ADE20K palette colours."""
    lookup = [ADE20K_CLASSES["wall"][1], ADE20K_CLASSES["floor"][1]]
    lookup += [ADE20K_CLASSES[KIND_CLASS[obj.kind]][1] for obj in scene.objects]
    return np.asarray(lookup, np.uint8)[ids]


def depth_map(depth: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: inverse depth min-max normalised to [0, 255], near = bright, as the MiDaS annotator."""
    disparity = 1.0 / depth  # (H, W)
    lo, hi = float(disparity.min()), float(disparity.max())
    scaled = (disparity - lo) / max(hi - lo, 1e-8)
    grey = np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def normal_map(normal: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 encoding of unit camera-frame normals (H, W, 3)."""
    signed = normal * np.asarray(NORMAL_RGB_SIGNS, np.float32)
    return np.clip(np.round((signed + 1.0) * 127.5), 0, 255).astype(np.uint8)


def decode_normal_map(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 unit normals from a normal map (inverse of `normal_map`, renormalised)."""
    signed = rgb.astype(np.float32) / 127.5 - 1.0
    normal = signed * np.asarray(NORMAL_RGB_SIGNS, np.float32)
    return normal / np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-6)


def _fixed(point: np.ndarray) -> tuple[int, int]:
    return tuple(int(v) for v in np.round(np.asarray(point) * (1 << SUBPIXEL_BITS)))


def lines_map(geometry: Geometry, ids: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the geometry's straight segments, each kept only where what it belongs to is visible."""
    size = ids.shape[0]
    out = np.zeros((size, size), np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    near = {}  # id -> pixels within 1 px of where that id is visible
    for owners, p0, p1 in geometry.segments:
        layer = np.zeros((size, size), np.uint8)
        cv2.line(layer, _fixed(p0), _fixed(p1), 255, LINE_WIDTH, cv2.LINE_8, SUBPIXEL_BITS)
        for owner in owners:
            if owner not in near:
                near[owner] = cv2.dilate((ids == owner).astype(np.uint8), kernel) > 0
            layer[~near[owner]] = 0
        out |= layer
    return np.repeat(out[..., None], 3, axis=2)


def scribble_map(ids: np.ndarray, seed: int) -> np.ndarray:
    """(H, W, 3) uint8: every visible object's outline, wobbled by smooth random waves, drawn thick."""
    size = ids.shape[0]
    rng = np.random.default_rng([seed, SCRIBBLE_STREAM])
    width = max(2, round(size * SCRIBBLE_WIDTH_FRACTION))
    amplitude = SCRIBBLE_JITTER_FRACTION * size
    out = np.zeros((size, size), np.uint8)
    for obj_id in range(FIRST_OBJECT_ID, int(ids.max()) + 1):
        region = (ids == obj_id).astype(np.uint8)
        contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        for contour in contours:
            points = contour[:, 0, :].astype(np.float32)  # (N, 2) x, y
            if len(points) < 3:
                continue
            t = np.linspace(0.0, 2.0 * np.pi, len(points), endpoint=False)[:, None]  # (N, 1)
            freqs = rng.integers(1, 5, size=(SCRIBBLE_WAVES, 2))
            phases = rng.uniform(0.0, 2.0 * np.pi, size=(SCRIBBLE_WAVES, 2))
            amps = rng.uniform(0.3, 1.0, size=(SCRIBBLE_WAVES, 2)) * amplitude / SCRIBBLE_WAVES
            wobble = sum(amps[k] * np.sin(freqs[k] * t + phases[k]) for k in range(SCRIBBLE_WAVES))  # (N, 2)
            jittered = np.round((points + wobble) * (1 << SUBPIXEL_BITS)).astype(np.int32)
            cv2.polylines(out, [jittered], True, 255, width, cv2.LINE_AA, SUBPIXEL_BITS)
    out = np.where(out >= 128, 255, 0).astype(np.uint8)  # binary strokes, as thresholded HED scribbles
    return np.repeat(out[..., None], 3, axis=2)


def canny_map(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 Canny edges of the (H, W, 3) RGB image, as the Canny annotator computes them."""
    edges = cv2.Canny(image, CANNY_LOW, CANNY_HIGH)
    return np.repeat(edges[..., None], 3, axis=2)


def condition_maps(
    names: tuple[str, ...], scene: Scene, image: np.ndarray, buf: Buffers, geometry: Geometry, seed: int
) -> dict[str, np.ndarray]:
    """The named condition maps of a scene rendered into `image` and the one-sample-per-pixel `buf`."""
    makers = {
        "canny": lambda: canny_map(image),
        "lines": lambda: lines_map(geometry, buf.ids),
        "scribble": lambda: scribble_map(buf.ids, seed),
        "pose": lambda: draw_openpose(list(geometry.keypoints), scene.size),
        "seg": lambda: seg_map(scene, buf.ids),
        "depth": lambda: depth_map(buf.depth),
        "normal": lambda: normal_map(buf.normal),
    }
    return {name: makers[name]() for name in names}
