"""Colour conventions of the released ControlNet condition maps, for the classes and joints of the world.

- Segmentation: the ADE20K 150-class palette (as in mmsegmentation / the UniFormer annotator the
  seg ControlNets were trained with); we use the entries of the classes our scenes contain.
- Pose: the OpenPose 18-keypoint COCO body layout and its standard colours (keypoint i and limb i share
  colour i; limbs are blended at 0.6 over the canvas).
- Normals: RGB = 255 * (1 + (-nx, ny, nz)) / 2 in camera coordinates (x right, y up, z toward the
  viewer): red = facing left, green = facing up, blue = facing the camera, so a surface facing the camera
  is (128, 128, 255). That is the frame ControlNet 1.1's `normalbae` maps are read in by third-party code
  ("x-left, y-up, z-forward"); we did not check it against the annotator's weights (none can be
  downloaded here), and inside the world only self-consistency matters (see `NORMAL_RGB_SIGNS`).
"""

from __future__ import annotations

# ADE20K class index (0-based, 150-class order) and palette colour of each class the world renders.
# "tent" stands for the pyramid: ADE20K has no pyramid class, and a tent is the closest shape.
ADE20K_CLASSES: dict[str, tuple[int, tuple[int, int, int]]] = {
    "wall": (0, (120, 120, 120)),
    "floor": (3, (80, 50, 50)),
    "person": (12, (150, 5, 61)),
    "box": (41, (0, 255, 20)),
    "tent": (114, (112, 224, 255)),
    "ball": (119, (255, 0, 163)),
}

# OpenPose body: 18 keypoints in COCO order.
OPENPOSE_KEYPOINTS: tuple[str, ...] = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
)
NUM_KEYPOINTS = 18

# The 17 limbs OpenPose draws, as (keypoint index, keypoint index); limb i is drawn in OPENPOSE_COLOURS[i].
OPENPOSE_LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
)

# Hue wheel in 18 steps of 85: the standard OpenPose body colours (RGB).
OPENPOSE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
    (255, 0, 85),
)
OPENPOSE_LIMB_ALPHA = 0.6  # limbs are blended over the canvas with this weight (keypoints are opaque)
OPENPOSE_REFERENCE_SIZE = 512  # the reference draws 4 px sticks and 4 px joint radii at this resolution
OPENPOSE_REFERENCE_WIDTH = 4

# Normal map encoding: rgb = 255 * (1 + sign * n) / 2 per channel, n = (nx, ny, nz) camera coordinates.
NORMAL_RGB_SIGNS: tuple[float, float, float] = (-1.0, 1.0, 1.0)
