"""A tiny z-buffer rasterizer for the world's primitives: spheres, planar convex faces and capsules.

Every primitive writes, where it is nearer than what is already there, its depth, its surface normal
(camera coordinates: x right, y up, z toward the viewer), an object id and an albedo colour. Geometry is
given in output-pixel units; a buffer may sample each output pixel `scale` x `scale` times (supersampling
for an anti-aliased image), so the same scene renders at any sampling density.

Depth model: each object is small next to its distance, so its relief is added to a reference depth
`z_ref` with the pinhole scale `z_ref / focal` (world units per pixel at that depth).
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=16)
def sample_grid(size: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(xs, ys), each (n, n) with n = size * scale: sample centres in output pixels, shared and read-only."""
    coords = (np.arange(size * scale, dtype=np.float32) + 0.5) / scale
    xs, ys = np.meshgrid(coords, coords)
    xs.flags.writeable = False
    ys.flags.writeable = False
    return xs, ys


class Buffers:
    """Per-sample depth, normal, object id and albedo of a square image of `size` px sampled `scale` times."""

    def __init__(self, size: int, scale: int = 1, focal: float | None = None) -> None:
        self.size, self.scale = size, scale
        self.focal = float(focal if focal is not None else size)  # px; image side = focal: ~53 degrees
        n = size * scale
        self.xs, self.ys = sample_grid(size, scale)  # (n, n) each, sample centres in output px (read-only)
        self.depth = np.full((n, n), np.inf, np.float32)  # (n, n) world units, larger = farther
        self.normal = np.zeros((n, n, 3), np.float32)  # (n, n, 3) unit vectors
        self.ids = np.full((n, n), -1, np.int16)  # (n, n) object id, -1 = nothing
        self.albedo = np.zeros((n, n, 3), np.float32)  # (n, n, 3) RGB in [0, 255]

    def window(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
        """Sample rows/cols covering the output-pixel box [x0, x1] x [y0, y1], clipped to the image."""
        n = self.size * self.scale
        c0, c1 = max(0, int(np.floor(x0 * self.scale))), min(n, int(np.ceil(x1 * self.scale)) + 1)
        r0, r1 = max(0, int(np.floor(y0 * self.scale))), min(n, int(np.ceil(y1 * self.scale)) + 1)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def write(
        self,
        win: tuple[slice, slice],
        mask: np.ndarray,  # (h, w) bool
        depth: np.ndarray,  # (h, w)
        normal: np.ndarray,  # (h, w, 3)
        obj_id: int,
        albedo: tuple[int, int, int],
    ) -> None:
        """z-test and write one primitive's samples inside the window `win`."""
        nearer = mask & (depth < self.depth[win])
        self.depth[win][nearer] = depth[nearer]
        self.normal[win][nearer] = normal[nearer]
        self.ids[win][nearer] = obj_id
        self.albedo[win][nearer] = albedo


def draw_sphere(
    buf: Buffers, centre: tuple[float, float], radius: float, z_ref: float, obj_id: int, albedo
) -> None:
    """A sphere whose silhouette is the disk (centre, radius) px and whose centre lies at depth z_ref."""
    cx, cy = centre
    win = buf.window(cx - radius, cy - radius, cx + radius, cy + radius)
    dx, dy = buf.xs[win] - cx, buf.ys[win] - cy  # (h, w)
    rho2 = (dx * dx + dy * dy) / (radius * radius)
    mask = rho2 < 1.0
    nz = np.sqrt(np.maximum(1.0 - rho2, 0.0))  # (h, w): the height of the unit sphere (rho2 >= 0)
    normal = np.stack([dx / radius, -dy / radius, nz], axis=-1)  # image y grows down, camera y up
    depth = z_ref - nz * radius * z_ref / buf.focal
    buf.write(win, mask, depth, normal, obj_id, albedo)


def draw_convex_face(
    buf: Buffers,
    vertices: np.ndarray,  # (N, 2) px, convex, any winding
    vertex_depths: np.ndarray,  # (N,) depth at each vertex (a plane through them)
    normal: tuple[float, float, float],
    obj_id: int,
    albedo,
) -> None:
    """A planar convex polygon with one normal; depth interpolated on the plane through its vertices."""
    vertices = np.asarray(vertices, np.float32)
    (x0, y0), (x1, y1) = vertices.min(axis=0), vertices.max(axis=0)
    win = buf.window(x0, y0, x1, y1)
    xs, ys = buf.xs[win], buf.ys[win]
    mask = convex_polygon_mask(xs, ys, vertices)
    design = np.column_stack([vertices, np.ones(len(vertices), np.float32)])  # (N, 3)
    plane, *_ = np.linalg.lstsq(design, np.asarray(vertex_depths, np.float32), rcond=None)
    depth = plane[0] * xs + plane[1] * ys + plane[2]
    unit = np.asarray(normal, np.float32) / np.linalg.norm(normal)
    buf.write(win, mask, depth, np.broadcast_to(unit, (*xs.shape, 3)), obj_id, albedo)


def draw_capsule(
    buf: Buffers, p0: np.ndarray, p1: np.ndarray, radius: float, z_ref: float, obj_id: int, albedo
) -> None:
    """A cylinder with round ends (a limb) between p0 and p1 (px), lying at depth z_ref in the image plane."""
    p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
    lo, hi = np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius
    win = buf.window(lo[0], lo[1], hi[0], hi[1])
    xs, ys = buf.xs[win], buf.ys[win]
    axis = p1 - p0
    t = ((xs - p0[0]) * axis[0] + (ys - p0[1]) * axis[1]) / max(float(axis @ axis), 1e-6)
    t = np.minimum(np.maximum(t, 0.0), 1.0)  # (np.clip's Python overhead dominates on tiny windows)
    dx, dy = xs - (p0[0] + t * axis[0]), ys - (p0[1] + t * axis[1])  # from the nearest axis point
    rho2 = (dx * dx + dy * dy) / (radius * radius)
    mask = rho2 < 1.0
    nz = np.sqrt(np.maximum(1.0 - rho2, 0.0))
    normal = np.stack([dx / radius, -dy / radius, nz], axis=-1)
    depth = z_ref - nz * radius * z_ref / buf.focal
    buf.write(win, mask, depth, normal, obj_id, albedo)


def convex_polygon_mask(xs: np.ndarray, ys: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """(h, w) bool: samples inside the convex polygon `vertices` (N, 2), either winding."""
    inside_pos = np.ones(xs.shape, bool)
    inside_neg = np.ones(xs.shape, bool)
    for (ax, ay), (bx, by) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        cross = (bx - ax) * (ys - ay) - (by - ay) * (xs - ax)
        inside_pos &= cross >= 0
        inside_neg &= cross <= 0
    return inside_pos | inside_neg
