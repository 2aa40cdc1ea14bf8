"""OpenPose keypoint rendering against hand-computed pixels of the released pose ControlNet's convention.

Convention (ControlNet 1.1 / controlnet_aux `draw_bodypose`, `draw_handpose`, `draw_facepose`):
limb k is an ellipse of half-width 4 px filled with int(0.6 x colour k); keypoint j a radius-4 disk in
colour j; colours in order (255,0,0), (255,85,0), (255,170,0), (255,255,0), (170,255,0), (85,255,0), ...
(0,0,255) is the 13th; limb order: neck-rshoulder, neck-lshoulder, rshoulder-relbow, ..., neck-nose is
the 13th. Hands: bone e coloured hsv(e / 20, 1, 1), 2 px; keypoints radius-4 (0, 0, 255). Face: radius-3 white.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from controlnet.annotate import get_annotator


def body18(points: dict[int, tuple[float, float]]) -> list[float]:
    flat = [0.0] * 54
    for index, (x, y) in points.items():
        flat[3 * index : 3 * index + 3] = [x, y, 1.0]
    return flat


SKELETON = {
    0: (100, 40),
    1: (100, 80),
    2: (60, 80),
    3: (60, 130),
    5: (140, 80),
}  # nose, neck, r/l shoulder, r elbow


def rendered(document: dict, **options) -> np.ndarray:
    return get_annotator("openpose_json", **options)(document)


@pytest.fixture
def pose_map():
    hand = [0.0] * 63
    hand[0:3] = [150, 150, 1]  # wrist
    hand[3:6] = [170, 150, 1]  # thumb base
    face = [30, 30, 1] * 1
    document = {
        "canvas_width": 200,
        "canvas_height": 200,
        "people": [
            {"pose_keypoints_2d": body18(SKELETON), "hand_right_keypoints_2d": hand, "face_keypoints_2d": face}
        ],
    }
    return rendered(document)


def px(image, x, y):
    return image[y, x].tolist()


def test_limbs_have_openpose_colours_at_sixty_percent(pose_map):
    assert pose_map.shape == (200, 200, 3)
    assert px(pose_map, 80, 80) == [153, 0, 0]  # neck -> right shoulder: 0.6 x (255, 0, 0)
    assert px(pose_map, 120, 80) == [153, 51, 0]  # neck -> left shoulder: 0.6 x (255, 85, 0)
    assert px(pose_map, 60, 105) == [153, 102, 0]  # right shoulder -> right elbow: 0.6 x (255, 170, 0)
    assert px(pose_map, 100, 60) == [0, 0, 153]  # neck -> nose: 0.6 x (0, 0, 255)


def test_limbs_are_four_pixels_half_width(pose_map):
    assert px(pose_map, 80, 83) == [153, 0, 0] and px(pose_map, 80, 77) == [153, 0, 0]
    assert px(pose_map, 80, 86) == [0, 0, 0] and px(pose_map, 80, 74) == [0, 0, 0]
    assert px(pose_map, 63, 105) == [153, 102, 0] and px(pose_map, 66, 105) == [0, 0, 0]


def test_keypoints_are_full_colour_disks_drawn_over_limbs(pose_map):
    assert px(pose_map, 100, 40) == [255, 0, 0]  # nose
    assert px(pose_map, 100, 80) == [255, 85, 0]  # neck
    assert px(pose_map, 103, 80) == [255, 85, 0]  # 3 px from the neck: inside the radius-4 disk
    assert px(pose_map, 60, 80) == [255, 170, 0]  # right shoulder
    assert px(pose_map, 60, 130) == [255, 255, 0]  # right elbow
    assert px(pose_map, 140, 80) == [85, 255, 0]  # left shoulder (6th colour)
    assert px(pose_map, 60, 140) == [0, 0, 0] and px(pose_map, 190, 10) == [0, 0, 0]


def test_hands_and_face(pose_map):
    assert px(pose_map, 160, 150) == [255, 0, 0]  # first hand bone: hue 0 = red, 2 px line
    assert px(pose_map, 160, 153) == [0, 0, 0]
    assert px(pose_map, 150, 150) == [0, 0, 255] and px(pose_map, 170, 152) == [0, 0, 255]  # hand points: blue
    assert px(pose_map, 30, 30) == [255, 255, 255] and px(pose_map, 32, 30) == [255, 255, 255]  # face: white
    assert px(pose_map, 35, 30) == [0, 0, 0]


def test_hands_and_face_can_be_left_out(pose_map):
    document = {
        "canvas_width": 200,
        "canvas_height": 200,
        "people": [{"pose_keypoints_2d": body18(SKELETON), "face_keypoints_2d": [30, 30, 1]}],
    }
    no_face = rendered(document, face=False)
    assert px(no_face, 30, 30) == [0, 0, 0] and px(no_face, 80, 80) == [153, 0, 0]


def test_body_25_is_reduced_to_coco_18():
    flat = [0.0] * 75
    flat[3 * 1 : 3 * 1 + 3] = [100, 50, 1]  # neck
    flat[3 * 8 : 3 * 8 + 3] = [100, 150, 1]  # BODY_25 mid-hip: not part of COCO-18
    flat[3 * 9 : 3 * 9 + 3] = [80, 150, 1]  # BODY_25 right hip = COCO-18 point 8
    image = rendered({"canvas_width": 200, "canvas_height": 200, "people": [{"pose_keypoints_2d": flat}]})
    assert px(image, 80, 150) == [0, 255, 170]  # 9th colour: right hip
    assert px(image, 100, 150) == [0, 0, 0]  # mid-hip dropped
    assert px(image, 90, 100) == [0, 153, 0]  # neck -> right hip, 7th limb: 0.6 x 7th colour (0, 255, 0)


def test_normalised_coordinates_and_canvas_override(tmp_path):
    points = {k: (x / 200, y / 200) for k, (x, y) in SKELETON.items()}
    path = tmp_path / "pose.json"
    path.write_text(json.dumps({"people": [{"pose_keypoints_2d": body18(points)}]}))
    image = get_annotator("openpose_json", width=200, height=200, normalized=True)(path)
    assert px(image, 80, 80) == [153, 0, 0] and px(image, 100, 80) == [255, 85, 0]


def test_bad_keypoint_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="canvas"):
        rendered({"people": []})
    with pytest.raises(ValueError, match="pose_keypoints_2d has 6 numbers"):
        rendered({"canvas_width": 9, "canvas_height": 9, "people": [{"pose_keypoints_2d": [1, 2, 3, 4, 5, 6]}]})
    with pytest.raises(ValueError, match="people"):
        rendered({"canvas_width": 9, "canvas_height": 9})
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        get_annotator("openpose_json")(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError):
        get_annotator("openpose_json")(tmp_path / "missing.json")


def test_openpose_json_round_trip_renders_the_same_map():
    from controlnet.annotate.keypoints import parse_openpose, render_pose, to_openpose

    document = {"canvas_width": 200, "canvas_height": 200, "people": [{"pose_keypoints_2d": body18(SKELETON)}]}
    people = parse_openpose(document)
    again = to_openpose(people, 200, 200)
    assert again["canvas_width"] == 200 and len(again["people"]) == 1
    np.testing.assert_array_equal(render_pose(parse_openpose(again), 200, 200), rendered(document))
