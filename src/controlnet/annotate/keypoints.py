"""Human pose maps from OpenPose-format keypoints (paper Sec. 4, "human pose"; ControlNet 1.1 openpose).

Renders the map the released pose ControlNets were trained on, from a keypoints JSON in the OpenPose
output format (`{"people": [{"pose_keypoints_2d": [x, y, c, ...], "hand_left_keypoints_2d": ...,
"hand_right_keypoints_2d": ..., "face_keypoints_2d": ...}], "canvas_width": W, "canvas_height": H}`), so
poses can be drawn by hand or taken from any detector. BODY_25 bodies are reduced to the 18-point COCO
layout the maps use. Drawing conventions (ControlNet 1.1 `draw_bodypose` / `draw_handpose` /
`draw_facepose`): each limb an ellipse of half-width 4 px in its colour x 0.6, each body keypoint a
radius-4 disk in full colour, hand bones 2 px lines coloured around the HSV hue circle, hand keypoints
radius-4 blue disks, face keypoints radius-3 white disks, on black.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# The 18-point COCO layout of OpenPose, index -> point: 0 nose, 1 neck, 2-4 right shoulder/elbow/wrist,
# 5-7 left shoulder/elbow/wrist, 8-10 right hip/knee/ankle, 11-13 left hip/knee/ankle, 14-15 right/left eye,
# 16-17 right/left ear.
NUM_BODY_POINTS = 18
# BODY_25 index of each COCO-18 point (BODY_25 adds mid-hip at 8 and six foot points at 19-24).
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
NUM_BODY25_POINTS = 25
NUM_HAND_POINTS = 21
# Limbs as (from, to) COCO-18 indices (the reference's 1-based `limbSeq` minus one); the reference
# draws the first 17 of its 19 pairs (the two shoulder-ear pairs are never drawn).
LIMBS = (
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
# OpenPose colours (RGB on the map): limb i uses COLORS[i], keypoint j uses COLORS[j].
COLORS = (
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
LIMB_HALF_WIDTH = 4  # reference `stickwidth = 4`: the ellipse's minor half-axis, px
LIMB_BRIGHTNESS = 0.6  # reference: limbs filled with `int(c * 0.6)` of their colour
BODY_POINT_RADIUS = 4
ELLIPSE_ANGLE_STEP = 1  # degrees between polygon vertices of the limb ellipse (reference `delta=1`)
# Hand bones: wrist (0) to each finger's four points, thumb first.
HAND_EDGES = tuple(
    (0 if joint == 0 else base + joint, base + joint + 1) for base in (0, 4, 8, 12, 16) for joint in range(4)
)
HAND_LINE_WIDTH = 2
HAND_POINT_RADIUS = 4
HAND_POINT_COLOR = (0, 0, 255)
FACE_POINT_RADIUS = 3
FACE_POINT_COLOR = (255, 255, 255)
DRAW_EPS = 0.01  # reference `eps`: hand/face points at pixel 0 (x or y) count as missing


@dataclass
class Person:
    """Keypoints of one person in pixels: each array (N, 3) of (x, y, confidence); confidence <= 0 = missing."""

    body: np.ndarray  # (18, 3)
    left_hand: np.ndarray | None = None  # (21, 3)
    right_hand: np.ndarray | None = None  # (21, 3)
    face: np.ndarray | None = None  # (F, 3), 70 points in OpenPose


def _points(values, key: str, person_index: int, counts: tuple[int, ...] | None) -> np.ndarray | None:
    if values is None or len(values) == 0:
        return None
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size % 3 or (counts is not None and array.size // 3 not in counts):
        expected = " or ".join(f"{3 * n}" for n in counts) if counts else "a multiple of 3"
        raise ValueError(f"keypoints: people[{person_index}].{key} has {array.size} numbers; expected {expected}")
    return array.reshape(-1, 3)


def parse_openpose(document: dict, scale: tuple[float, float] = (1.0, 1.0)) -> list[Person]:
    """OpenPose-format dict -> people in pixels; `scale` = (width, height) multiplies normalised coordinates."""
    if not isinstance(document, dict) or not isinstance(document.get("people"), list):
        raise ValueError("keypoints: expected an OpenPose JSON object with a 'people' list")
    people = []
    for index, entry in enumerate(document["people"]):
        if not isinstance(entry, dict):
            raise ValueError(f"keypoints: people[{index}] is {type(entry).__name__}; expected an object")
        body = _points(
            entry.get("pose_keypoints_2d"), "pose_keypoints_2d", index, (NUM_BODY_POINTS, NUM_BODY25_POINTS)
        )
        if body is None:
            body = np.zeros((NUM_BODY_POINTS, 3))
        elif len(body) == NUM_BODY25_POINTS:
            body = body[list(BODY25_TO_COCO18)]
        parts = {
            key: _points(entry.get(f"{key}_keypoints_2d"), f"{key}_keypoints_2d", index, counts)
            for key, counts in (
                ("hand_left", (NUM_HAND_POINTS,)),
                ("hand_right", (NUM_HAND_POINTS,)),
                ("face", None),
            )
        }
        person = Person(body, parts["hand_left"], parts["hand_right"], parts["face"])
        for array in (person.body, person.left_hand, person.right_hand, person.face):
            if array is not None:
                array[:, 0] *= scale[0]
                array[:, 1] *= scale[1]
        people.append(person)
    return people


def draw_body(canvas: np.ndarray, body: np.ndarray) -> None:
    """Draw limbs (ellipses at 0.6 brightness) then keypoints (disks) of one (18, 3) body on (H, W, 3)."""
    present = body[:, 2] > 0  # (18,)
    for limb_index, (start, end) in enumerate(LIMBS):
        if not (present[start] and present[end]):
            continue
        (x0, y0), (x1, y1) = body[start, :2], body[end, :2]
        length = math.hypot(x1 - x0, y1 - y0)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        center = (int((x0 + x1) / 2), int((y0 + y1) / 2))
        polygon = cv2.ellipse2Poly(
            center, (int(length / 2), LIMB_HALF_WIDTH), int(angle), 0, 360, ELLIPSE_ANGLE_STEP
        )
        color = [int(c * LIMB_BRIGHTNESS) for c in COLORS[limb_index]]
        cv2.fillConvexPoly(canvas, polygon, color)
    for point_index in np.flatnonzero(present):
        x, y = body[point_index, :2]
        cv2.circle(canvas, (int(x), int(y)), BODY_POINT_RADIUS, COLORS[point_index], thickness=-1)


def draw_hand(canvas: np.ndarray, hand: np.ndarray) -> None:
    """Draw one (21, 3) hand: bones as 2 px lines coloured by hue, keypoints as blue disks."""
    present = hand[:, 2] > 0
    pixels = hand[:, :2].astype(np.int64)  # (21, 2): reference truncates with int()
    visible = present & (pixels[:, 0] > DRAW_EPS) & (pixels[:, 1] > DRAW_EPS)
    for edge_index, (start, end) in enumerate(HAND_EDGES):
        if visible[start] and visible[end]:
            color = [255.0 * c for c in colorsys.hsv_to_rgb(edge_index / len(HAND_EDGES), 1.0, 1.0)]
            cv2.line(canvas, tuple(map(int, pixels[start])), tuple(map(int, pixels[end])), color, HAND_LINE_WIDTH)
    for point in pixels[visible]:
        cv2.circle(canvas, (int(point[0]), int(point[1])), HAND_POINT_RADIUS, HAND_POINT_COLOR, thickness=-1)


def draw_face(canvas: np.ndarray, face: np.ndarray) -> None:
    """Draw (F, 3) face keypoints as white radius-3 disks."""
    pixels = face[:, :2].astype(np.int64)
    visible = (face[:, 2] > 0) & (pixels[:, 0] > DRAW_EPS) & (pixels[:, 1] > DRAW_EPS)
    for point in pixels[visible]:
        cv2.circle(canvas, (int(point[0]), int(point[1])), FACE_POINT_RADIUS, FACE_POINT_COLOR, thickness=-1)


def render_pose(
    people: list[Person], height: int, width: int, hands: bool = True, face: bool = True
) -> np.ndarray:
    """People in pixels -> (height, width, 3) uint8 pose map; per person: body, hands, face (reference order)."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for person in people:
        draw_body(canvas, person.body)
        for hand in (person.left_hand, person.right_hand):
            if hands and hand is not None:
                draw_hand(canvas, hand)
        if face and person.face is not None:
            draw_face(canvas, person.face)
    return canvas


def to_openpose(people: list[Person], height: int, width: int) -> dict:
    """People in pixels -> an OpenPose-format JSON object (the inverse of `parse_openpose`), for editing."""

    def flat(array: np.ndarray | None) -> list[float]:
        return [] if array is None else [round(float(v), 3) for v in array.reshape(-1)]

    return {
        "version": 1.3,
        "canvas_width": width,
        "canvas_height": height,
        "people": [
            {
                "pose_keypoints_2d": flat(person.body),
                "hand_left_keypoints_2d": flat(person.left_hand),
                "hand_right_keypoints_2d": flat(person.right_hand),
                "face_keypoints_2d": flat(person.face),
            }
            for person in people
        ],
    }


def read_keypoints(path: str | Path) -> dict:
    """Read an OpenPose keypoints JSON file, with one clear error when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"keypoints file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"keypoints: cannot read {path} as JSON ({err})") from None


@dataclass
class PoseKeypoints:
    """OpenPose keypoints JSON (dict or path) -> (H, W, 3) uint8 pose map. Not an image annotator."""

    width: int | None = None
    """Canvas width in pixels; default: the JSON's `canvas_width`."""
    height: int | None = None
    """Canvas height in pixels; default: the JSON's `canvas_height`."""
    normalized: bool = False
    """Coordinates are fractions of the canvas (0..1) instead of pixels."""
    hands: bool = True
    """Draw hands when the JSON has them."""
    face: bool = True
    """Draw the face when the JSON has it."""

    name = "openpose_json"
    input_kind = "keypoints"

    def __post_init__(self) -> None:
        for key in ("width", "height"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{key}: got {value!r}; expected a positive integer or None")

    def canvas_size(self, document: dict) -> tuple[int, int]:
        height = self.height or document.get("canvas_height")
        width = self.width or document.get("canvas_width")
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
            raise ValueError(
                "keypoints: no canvas size (the JSON has no positive integer canvas_width/canvas_height); "
                "pass width and height"
            )
        return height, width

    def __call__(self, keypoints: dict | str | Path) -> np.ndarray:
        document = keypoints if isinstance(keypoints, dict) else read_keypoints(keypoints)
        height, width = self.canvas_size(document)
        people = parse_openpose(document, (width, height) if self.normalized else (1.0, 1.0))
        return render_pose(people, height, width, hands=self.hands, face=self.face)
