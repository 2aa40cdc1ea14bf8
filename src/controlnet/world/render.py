"""Render a `Scene`: the shaded RGB image, the per-pixel truth (depth, normals, object ids), and the
geometry the condition maps are drawn from (straight segments, keypoints).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from controlnet.world.fill import COLOURS
from controlnet.world.pose import HEAD_RADIUS, TORSO_RADIUS, body_segments, skeleton
from controlnet.world.raster import Buffers, draw_capsule, draw_convex_face, draw_sphere, sample_grid
from controlnet.world.scene import (
    FAR_DEPTH,
    VANISHING_ROW,
    WALL_LINE,
    Scene,
    SceneObject,
    floor_depth,
    half_width,
    person_height,
)

WALL_ID, FLOOR_ID, FIRST_OBJECT_ID = 0, 1, 2  # object i of the scene has id FIRST_OBJECT_ID + i
SUPERSAMPLE = 2  # samples per pixel side for the RGB image (truth maps take one sample at each pixel centre)
FLOOR_DIM = 0.6  # the floor is the background colour at this brightness
SKIN = (230, 190, 160)  # a person's head
LIGHT = np.array([-0.45, 0.65, 0.6], np.float32) / np.linalg.norm([-0.45, 0.65, 0.6])  # from upper left front
AMBIENT, DIFFUSE = 0.35, 0.65
FACING_CAMERA = np.array([0.0, 0.0, 1.0], np.float32)
FLOOR_NORMAL = (0.0, 0.87, 0.5)  # up, tilted toward the camera that looks slightly down at it
# Face normals of the boxes' and pyramids' visible faces (camera frame; x right, y up, z to the viewer).
BOX_TOP_NORMAL = (0.0, 0.9, 0.45)
BOX_SIDE_NORMAL = (0.9, 0.0, 0.45)  # right side; the left side mirrors x
PYRAMID_FACE_NORMAL = (0.8, 0.35, 0.5)  # right face; the left face mirrors x
KIND_CLASS = {"ball": "ball", "box": "box", "pyramid": "tent", "person": "person"}  # ADE20K class per kind


@dataclass
class Geometry:
    """Drawing-independent geometry of a rendered scene, in output pixels."""

    segments: list[tuple[tuple[int, ...], np.ndarray, np.ndarray]]  # (ids it belongs to, p0, p1) straight edges
    keypoints: np.ndarray  # (P, 18, 2) OpenPose keypoints (x, y) of the P people
    object_depths: np.ndarray  # (K,) reference depth of each object (where it stands on the floor)


def _recession(obj: SceneObject, size: int, hw: float) -> tuple[float, float, float]:
    """(sx, sy, world depth) of a footprint as deep as it is wide: how its back edge shifts in the image."""
    z = float(floor_depth(obj.ground, size))
    depth = 2.0 * hw * z / size  # world units: the width at that distance (focal = size)
    # the back edge stands where the floor is `depth` farther; invert floor_depth for its row
    back_row = size * (VANISHING_ROW + (obj.ground / size - VANISHING_ROW) * z / (z + depth))
    sy = obj.ground - back_row
    sx = -(obj.x - size / 2) * depth / (z + depth)  # receding edges converge toward the image centre
    return sx, sy, depth


def _draw_box(buf: Buffers, obj: SceneObject, obj_id: int, segments: list) -> None:
    size, hw = buf.size, half_width(obj, buf.size)
    z = float(floor_depth(obj.ground, size))
    sx, sy, depth = _recession(obj, size, hw)
    x0, x1, yb, yt = obj.x - hw, obj.x + hw, obj.ground, obj.ground - 2 * hw * obj.aspect
    colour = COLOURS[obj.colour]
    front = np.array([[x0, yt], [x1, yt], [x1, yb], [x0, yb]], np.float32)
    draw_convex_face(buf, front, [z] * 4, tuple(FACING_CAMERA), obj_id, colour)
    top = np.array([[x0, yt], [x1, yt], [x1 + sx, yt - sy], [x0 + sx, yt - sy]], np.float32)
    draw_convex_face(buf, top, [z, z, z + depth, z + depth], BOX_TOP_NORMAL, obj_id, colour)
    xe = x1 if sx > 0 else x0  # the visible side is the one facing the image centre
    side = np.array([[xe, yt], [xe, yb], [xe + sx, yb - sy], [xe + sx, yt - sy]], np.float32)
    normal = (np.sign(sx) * BOX_SIDE_NORMAL[0], *BOX_SIDE_NORMAL[1:])
    draw_convex_face(buf, side, [z, z, z + depth, z + depth], normal, obj_id, colour)
    for poly in (front, top, side):
        for a, b in zip(poly, np.roll(poly, -1, axis=0), strict=True):
            segments.append(((obj_id,), a, b))


def _draw_pyramid(buf: Buffers, obj: SceneObject, obj_id: int, segments: list) -> None:
    size, hw = buf.size, half_width(obj, buf.size)
    z = float(floor_depth(obj.ground, size))
    _, sy, depth = _recession(obj, size, hw)
    left = np.array([obj.x - hw, obj.ground - sy / 2], np.float32)
    front = np.array([obj.x, obj.ground], np.float32)
    right = np.array([obj.x + hw, obj.ground - sy / 2], np.float32)
    apex = np.array([obj.x, obj.ground - 2 * hw * obj.aspect], np.float32)
    colour = COLOURS[obj.colour]
    mid = z + depth / 2
    nx, ny, nz = PYRAMID_FACE_NORMAL
    draw_convex_face(buf, np.stack([left, front, apex]), [mid, z, mid], (-nx, ny, nz), obj_id, colour)
    draw_convex_face(buf, np.stack([front, right, apex]), [z, mid, mid], (nx, ny, nz), obj_id, colour)
    for a, b in ((left, front), (front, right), (front, apex), (left, apex), (right, apex)):
        segments.append(((obj_id,), a, b))


def _draw_person(buf: Buffers, obj: SceneObject, obj_id: int, segments: list) -> np.ndarray:
    """Capsule limbs and torso, a sphere head; each body part's two straight sides join `segments`."""
    height = person_height(obj, buf.size)
    z = float(floor_depth(obj.ground, buf.size))
    keypoints = skeleton((obj.x, obj.ground), height, obj.pose)
    torso_world = TORSO_RADIUS * height * z / buf.focal
    for p0, p1, radius in body_segments(keypoints):
        is_torso = radius == TORSO_RADIUS
        z_ref = z if is_torso else z - torso_world  # limbs in front of the torso
        draw_capsule(buf, p0, p1, radius * height, z_ref, obj_id, COLOURS[obj.colour])
        axis = p1 - p0
        length = float(np.hypot(*axis))
        if length > 2 * radius * height:  # a limb longer than it is thick has two straight sides
            offset = np.array([-axis[1], axis[0]], np.float32) / length * radius * height
            segments += [((obj_id,), p0 + side * offset, p1 + side * offset) for side in (-1.0, 1.0)]
    draw_sphere(buf, tuple(keypoints[0]), HEAD_RADIUS * height, z - torso_world, obj_id, SKIN)
    return keypoints


@functools.lru_cache(maxsize=16)
def _backdrop(size: int, scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Wall and floor: depth (n, n), normal (n, n, 3), ids (n, n) and brightness (n, n) (cached, read-only)."""
    _, ys = sample_grid(size, scale)
    wall = ys < WALL_LINE * size
    depth = np.where(wall, FAR_DEPTH, floor_depth(ys, size)).astype(np.float32)
    floor_normal = np.array(FLOOR_NORMAL, np.float32) / np.linalg.norm(FLOOR_NORMAL)
    normal = np.where(wall[..., None], FACING_CAMERA, floor_normal).astype(np.float32)
    ids = np.where(wall, WALL_ID, FLOOR_ID).astype(np.int16)
    brightness = np.where(wall, 1.0, FLOOR_DIM).astype(np.float32)
    for array in (depth, normal, ids, brightness):
        array.flags.writeable = False
    return depth, normal, ids, brightness


def draw_scene(scene: Scene, scale: int = 1) -> tuple[Buffers, Geometry]:
    """Rasterize the scene at `scale` samples per pixel side; return the buffers and the scene's geometry."""
    size = scene.size
    buf = Buffers(size, scale)
    depth, normal, ids, brightness = _backdrop(size, scale)
    buf.depth[:], buf.normal[:], buf.ids[:] = depth, normal, ids
    np.multiply(brightness[..., None], np.array(COLOURS[scene.background], np.float32), out=buf.albedo)
    wall_line = WALL_LINE * size
    segments: list = [((WALL_ID, FLOOR_ID), np.array([0.0, wall_line]), np.array([size - 1.0, wall_line]))]
    people, depths = [], []
    for i, obj in enumerate(scene.objects):
        obj_id = FIRST_OBJECT_ID + i
        depths.append(float(floor_depth(obj.ground, size)))
        if obj.kind == "ball":
            hw = half_width(obj, size)
            draw_sphere(buf, (obj.x, obj.ground - hw), hw, depths[-1], obj_id, COLOURS[obj.colour])
        elif obj.kind == "box":
            _draw_box(buf, obj, obj_id, segments)
        elif obj.kind == "pyramid":
            _draw_pyramid(buf, obj, obj_id, segments)
        else:
            people.append(_draw_person(buf, obj, obj_id, segments))
    keypoints = np.stack(people).astype(np.float32) if people else np.zeros((0, 18, 2), np.float32)
    return buf, Geometry(segments, keypoints, np.array(depths, np.float32))


def scene_keypoints(scene: Scene) -> np.ndarray:
    """(P, 18, 2) OpenPose keypoints of the scene's people, without rasterizing anything."""
    people = [
        skeleton((obj.x, obj.ground), person_height(obj, scene.size), obj.pose)
        for obj in scene.objects
        if obj.kind == "person"
    ]
    return np.stack(people).astype(np.float32) if people else np.zeros((0, 18, 2), np.float32)


def shade(buf: Buffers) -> np.ndarray:
    """(n, n, 3) float RGB: Lambertian objects, normalised so a face toward the camera shows its named colour;
    the wall and floor are unlit (flat colours)."""
    objects = buf.ids >= FIRST_OBJECT_ID  # (n, n)
    reference = AMBIENT + DIFFUSE * float(FACING_CAMERA @ LIGHT)
    factor = np.ones(buf.ids.shape, np.float32)
    factor[objects] = (AMBIENT + DIFFUSE * np.maximum(buf.normal[objects] @ LIGHT, 0.0)) / reference
    return np.minimum(buf.albedo * factor[..., None], 255.0)  # albedo >= 0, factor > 0


def render_image(scene: Scene) -> np.ndarray:
    """(H, W, 3) uint8: the scene shaded and anti-aliased by SUPERSAMPLE x SUPERSAMPLE samples per pixel."""
    buf, _ = draw_scene(scene, SUPERSAMPLE)
    size = scene.size
    rgb = cv2.resize(shade(buf), (size, size), interpolation=cv2.INTER_AREA)  # exact box average of each block
    return np.round(rgb).astype(np.uint8)
