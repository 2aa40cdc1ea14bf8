"""Stick-figure people: 18 OpenPose keypoints from a few joint angles, and the OpenPose keypoint map.

The paper's pose ControlNet reads OpenPose maps: coloured limbs between the 18 COCO body keypoints on
black (Sec. 4, "human pose"). A person here faces the camera, so their right side is on the image's left.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from controlnet.world.palette import (
    NUM_KEYPOINTS,
    OPENPOSE_COLOURS,
    OPENPOSE_LIMB_ALPHA,
    OPENPOSE_LIMBS,
    OPENPOSE_REFERENCE_SIZE,
    OPENPOSE_REFERENCE_WIDTH,
)

# Body proportions as fractions of the standing height H (nose to ankle ~ 0.93 H).
HEAD_RADIUS = 0.075
NECK_HEIGHT = 0.80  # neck above the ankles
NOSE_ABOVE_NECK = 0.09
EYE_OFFSET = (0.028, 0.025)  # (sideways, up) from the nose
EAR_OFFSET = (0.055, 0.01)
SHOULDER_HALF_WIDTH = 0.12
HIP_HALF_WIDTH = 0.065
TORSO_LENGTH = 0.33  # neck to mid-hip
UPPER_ARM, FOREARM = 0.16, 0.15
THIGH, SHIN = 0.23, 0.22
LIMB_RADIUS = 0.035  # limb thickness for the rendered body
TORSO_RADIUS = 0.075
# Ranges (degrees) of random poses: arms from nearly down to raised, elbows and knees bent either way.
ARM_RANGE, ELBOW_RANGE, LEG_RANGE, KNEE_RANGE = (5.0, 160.0), (-60.0, 60.0), (0.0, 30.0), (-15.0, 15.0)


@dataclass(frozen=True)
class PoseAngles:
    """Joint angles in degrees. Arm/leg angles are measured from straight down, positive = away from the body."""

    right_arm: float = 20.0
    right_elbow: float = 10.0  # extra bend of the forearm, same sense
    left_arm: float = 20.0
    left_elbow: float = 10.0
    right_leg: float = 8.0
    right_knee: float = 0.0
    left_leg: float = 8.0
    left_knee: float = 0.0

    @staticmethod
    def random(rng: np.random.Generator) -> PoseAngles:
        """Uniform angles in the ranges below, drawn in field order."""
        ranges = (ARM_RANGE, ELBOW_RANGE, ARM_RANGE, ELBOW_RANGE, LEG_RANGE, KNEE_RANGE, LEG_RANGE, KNEE_RANGE)
        return PoseAngles(*(float(rng.uniform(lo, hi)) for lo, hi in ranges))


def _down(angle_deg: float, outward: float) -> np.ndarray:
    """Unit vector (x, y) in image coordinates pointing `angle_deg` away from straight down, toward `outward` (+-1)."""
    a = np.deg2rad(angle_deg)
    return np.array([outward * np.sin(a), np.cos(a)], np.float32)


def skeleton(ground: tuple[float, float], height: float, angles: PoseAngles) -> np.ndarray:
    """(18, 2) keypoints (x, y) px of a person standing with the lower ankle on `ground` (x, y), `height` px tall."""
    gx, gy = ground
    k = np.zeros((NUM_KEYPOINTS, 2), np.float32)
    neck = np.array([gx, gy - NECK_HEIGHT * height], np.float32)
    k[1] = neck
    k[0] = neck - [0.0, NOSE_ABOVE_NECK * height]
    # person's right = image left (-x)
    for side, shoulder, elbow, wrist, arm, bend in (
        (-1.0, 2, 3, 4, angles.right_arm, angles.right_elbow),
        (1.0, 5, 6, 7, angles.left_arm, angles.left_elbow),
    ):
        k[shoulder] = neck + [side * SHOULDER_HALF_WIDTH * height, 0.0]
        k[elbow] = k[shoulder] + UPPER_ARM * height * _down(arm, side)
        k[wrist] = k[elbow] + FOREARM * height * _down(arm + bend, side)
    mid_hip = neck + [0.0, TORSO_LENGTH * height]
    for side, hip, knee, ankle, leg, bend in (
        (-1.0, 8, 9, 10, angles.right_leg, angles.right_knee),
        (1.0, 11, 12, 13, angles.left_leg, angles.left_knee),
    ):
        k[hip] = mid_hip + [side * HIP_HALF_WIDTH * height, 0.0]
        k[knee] = k[hip] + THIGH * height * _down(leg, side)
        k[ankle] = k[knee] + SHIN * height * _down(leg + bend, side)
    for side, eye, ear in ((-1.0, 14, 16), (1.0, 15, 17)):
        k[eye] = k[0] + [side * EYE_OFFSET[0] * height, -EYE_OFFSET[1] * height]
        k[ear] = k[0] + [side * EAR_OFFSET[0] * height, -EAR_OFFSET[1] * height]
    k[:, 1] += gy - max(k[10, 1], k[13, 1])  # stand on the ground
    return k


def body_segments(keypoints: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """The rendered body as capsules (p0, p1, radius as a fraction of height): limbs and torso."""
    mid_hip = (keypoints[8] + keypoints[11]) / 2
    limbs = [(2, 3), (3, 4), (5, 6), (6, 7), (8, 9), (9, 10), (11, 12), (12, 13), (2, 5), (8, 11)]
    segments = [(keypoints[a], keypoints[b], LIMB_RADIUS) for a, b in limbs]
    segments.append((keypoints[1], mid_hip, TORSO_RADIUS))
    return segments


def openpose_width(size: int) -> int:
    """Stick half-width and joint radius in px: the reference's 4 px at 512 px, scaled, at least 1."""
    return max(1, round(OPENPOSE_REFERENCE_WIDTH * size / OPENPOSE_REFERENCE_SIZE))


def draw_openpose(people: list[np.ndarray], size: int) -> np.ndarray:
    """(size, size, 3) uint8 OpenPose map of people (each (18, 2) keypoints px): joints, then blended limbs.

    The order and the 0.6 blend are the paper's reference code (ControlNet 1.0); 1.1's `draw_bodypose`
    (controlnet.annotate.keypoints.draw_body) fills limbs at 0.6 brightness, then joints. They differ only
    where limbs overlap. Widths scale with the image (4 px at 512 px), so 64 px maps keep thin sticks.
    """
    canvas = np.zeros((size, size, 3), np.uint8)
    width = openpose_width(size)
    for keypoints in people:
        for i, (x, y) in enumerate(keypoints):
            cv2.circle(canvas, (int(round(x)), int(round(y))), width, OPENPOSE_COLOURS[i], -1)
    for keypoints in people:
        for i, (a, b) in enumerate(OPENPOSE_LIMBS):
            (xa, ya), (xb, yb) = keypoints[a], keypoints[b]
            length = float(np.hypot(xb - xa, yb - ya))
            angle = float(np.degrees(np.arctan2(yb - ya, xb - xa)))
            centre = (int(round((xa + xb) / 2)), int(round((ya + yb) / 2)))
            polygon = cv2.ellipse2Poly(
                centre, (max(1, int(round(length / 2))), width), int(round(angle)), 0, 360, 1
            )
            layer = canvas.copy()
            cv2.fillConvexPoly(layer, polygon, OPENPOSE_COLOURS[i])
            canvas = cv2.addWeighted(canvas, 1.0 - OPENPOSE_LIMB_ALPHA, layer, OPENPOSE_LIMB_ALPHA, 0)
    return canvas
