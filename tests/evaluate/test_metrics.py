"""Each metric: ground truth near its maximum, shuffled pairs near the floor, a 4 px shift measurably lower."""

import cv2
import numpy as np
import pytest

from controlnet.evaluate.common import tolerant_f1
from controlnet.evaluate.edges import canny_f1, lines_f1, scribble_f1
from controlnet.evaluate.fill import fill_colour_accuracy, fill_colour_error, fill_iou, region_from_outline
from controlnet.evaluate.pose import pose_overlap
from controlnet.evaluate.regions import depth_layer_miou, depth_silhouette_iou, normal_silhouette_iou, seg_miou
from controlnet.world.fill import COLOURS, fill_sample
from controlnet.world.scene import Scene, SceneObject
from controlnet.world.scene_sample import render_scene, scene_sample

N = 12


def shift(image, px=4):
    """The image moved right by px, the left edge repeated."""
    out = np.roll(image, px, axis=1)
    out[:, :px] = image[:, :1]
    return out


def scores(fn, task, make):
    samples = [make(i) for i in range(N)]
    gt = np.mean([fn(s.image, s.conditions[task]) for s in samples])
    shuffled = np.mean([fn(samples[(i + 1) % N].image, s.conditions[task]) for i, s in enumerate(samples)])
    shifted = np.mean([fn(shift(s.image), s.conditions[task]) for s in samples])
    return gt, shuffled, shifted


# (metric, task, ceiling at least, shuffled at most, shift lowers by at least)
CASES = [
    (canny_f1, "canny", 0.95, 0.5, 0.2),
    (lines_f1, "lines", 0.65, 0.5, 0.1),
    (scribble_f1, "scribble", 0.8, 0.5, 0.1),
    (seg_miou, "seg", 0.75, 0.6, 0.15),
    (depth_silhouette_iou, "depth", 0.75, 0.3, 0.25),
    (depth_layer_miou, "depth", 0.6, 0.45, 0.15),
    (normal_silhouette_iou, "normal", 0.75, 0.3, 0.25),
    (pose_overlap, "pose", 0.85, 0.5, 0.15),
]


@pytest.mark.parametrize(
    ("fn", "task", "ceiling", "shuffled_max", "shift_drop"), CASES, ids=[c[0].__name__ for c in CASES]
)
def test_scene_metric_ceiling_floor_and_shift(fn, task, ceiling, shuffled_max, shift_drop):
    gt, shuffled, shifted = scores(fn, task, lambda i: scene_sample(i, 64, require_person=task == "pose"))
    assert gt >= ceiling, gt
    assert shuffled <= shuffled_max and shuffled < gt - 0.2, (gt, shuffled)
    assert shifted <= gt - shift_drop, (gt, shifted)
    assert 0.0 <= shuffled <= 1.0 and 0.0 <= gt <= 1.0


def degrade(image, rng, sigma=12.0):
    """What a small generator's output looks like: slightly blurred, with pixel noise."""
    blurred = cv2.GaussianBlur(image, (3, 3), 0.8).astype(np.float32)
    return np.clip(blurred + rng.normal(0.0, sigma, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("fn", "task"), [c[:2] for c in CASES], ids=[c[0].__name__ for c in CASES])
def test_scene_metrics_tolerate_blur_and_noise(fn, task):
    rng = np.random.default_rng(0)
    samples = [scene_sample(i, 64, require_person=task == "pose") for i in range(N)]
    clean = np.mean([fn(s.image, s.conditions[task]) for s in samples])
    noisy = np.mean([fn(degrade(s.image, rng), s.conditions[task]) for s in samples])
    shuffled = np.mean(
        [fn(degrade(samples[(i + 1) % N].image, rng), s.conditions[task]) for i, s in enumerate(samples)]
    )
    assert noisy > clean - 0.15 and noisy > shuffled + 0.2, (clean, noisy, shuffled)


@pytest.mark.parametrize(("near_kind", "far_kind"), [("ball", "box"), ("pyramid", "box"), ("box", "pyramid")])
def test_depth_layers_notice_the_wrong_object_in_front(near_kind, far_kind):
    """Paint the far object over the near one: silhouettes are unchanged, the layers are not."""
    near = SceneObject(near_kind, "red", "big", 30.0, 60.0)
    far = SceneObject(far_kind, "blue", "big", 38.0, 46.0)
    right = render_scene(Scene(64, "white", (near, far)))
    far_alone = render_scene(Scene(64, "white", (far,)))
    wrong = right.image.copy()
    far_mask = far_alone.truth["ids"] == 2
    wrong[far_mask] = far_alone.image[far_mask]
    depth = right.conditions["depth"]
    assert abs(depth_silhouette_iou(wrong, depth) - depth_silhouette_iou(right.image, depth)) < 0.01
    assert depth_layer_miou(wrong, depth) < depth_layer_miou(right.image, depth) - 0.05


def test_fill_placement_metric():
    gt, shuffled, shifted = scores(fill_iou, "fill", fill_sample)
    assert gt > 0.99 and shuffled < 0.5 and shifted < 0.9


def test_fill_placement_ignores_colours_and_colour_ignores_placement():
    s = fill_sample(4)
    condition = s.conditions["fill"]
    recoloured = s.image.copy()
    mask = s.truth["mask"]
    recoloured[mask], recoloured[~mask] = (0, 0, 0), (255, 255, 255)  # wrong colours, right place
    assert fill_iou(recoloured, condition) > 0.99
    assert fill_colour_accuracy(recoloured, condition, s.prompt) < 1.0
    assert fill_colour_accuracy(shift(s.image, 2), condition, s.prompt) == 1.0  # right colours, slightly off


def test_fill_colour_metrics_on_truth_and_shuffles():
    samples = [fill_sample(i) for i in range(N)]
    acc = [fill_colour_accuracy(s.image, s.conditions["fill"], s.prompt) for s in samples]
    err = [fill_colour_error(s.image, s.conditions["fill"], s.prompt) for s in samples]
    assert np.mean(acc) == 1.0 and np.max(err) < 0.02
    other = [
        fill_colour_accuracy(samples[(i + 1) % N].image, s.conditions["fill"], s.prompt)
        for i, s in enumerate(samples)
    ]
    other_err = [
        fill_colour_error(samples[(i + 1) % N].image, s.conditions["fill"], s.prompt)
        for i, s in enumerate(samples)
    ]
    assert np.mean(other) < 0.5 and np.mean(other_err) > 0.3


def test_fill_colour_error_is_the_distance_to_the_named_colours():
    s = fill_sample(2)
    colour, background = s.prompt.split()[0], s.prompt.split()[3]
    image = s.image.copy()
    image[s.truth["mask"]] = np.clip(np.array(COLOURS[colour]) + [30, 0, 0], 0, 255)  # off by at most 30 in red
    image[~s.truth["mask"]] = COLOURS[background]
    expected = np.linalg.norm(np.clip(np.array(COLOURS[colour]) + [30, 0, 0], 0, 255) - COLOURS[colour]) / 255 / 2
    assert fill_colour_error(image, s.conditions["fill"], s.prompt) == pytest.approx(expected, abs=1e-6)


def test_region_from_outline_fills_a_square():
    condition = np.zeros((10, 10, 3), np.uint8)
    condition[2, 2:8] = condition[7, 2:8] = condition[2:8, 2] = condition[2:8, 7] = 255
    expected = np.zeros((10, 10), bool)
    expected[2:8, 2:8] = True
    assert np.array_equal(region_from_outline(condition), expected)


def test_tolerant_f1_by_hand():
    a = np.zeros((20, 20), bool)
    a[10, 2:18] = True
    b = np.roll(a, 1, axis=0)  # the same line one row lower
    assert tolerant_f1(a, b, 1.0) == 1.0
    assert tolerant_f1(a, b, 0.5) == 0.0
    c = a.copy()
    c[3, 2:18] = True  # a spurious line: precision 1/2, recall 1 -> F1 2/3
    assert tolerant_f1(c, a, 1.0) == pytest.approx(2 / 3)
    assert tolerant_f1(np.zeros_like(a), np.zeros_like(a), 1.0) == 1.0
    assert tolerant_f1(a, np.zeros_like(a), 1.0) == 0.0


def test_pose_without_people():
    s = scene_sample(0, 64, conditions=["pose"])
    empty = np.zeros((64, 64, 3), np.uint8)
    flat = np.full((64, 64, 3), 90, np.uint8)
    assert pose_overlap(flat, empty) == 1.0
    assert s.info["scene"].objects and pose_overlap(s.image, empty) == 0.0  # objects where no one should be


def test_metrics_reject_mismatched_images():
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="generated"):
        canny_f1(np.zeros((32, 32, 3), np.uint8), image)
    with pytest.raises(ValueError, match="condition"):
        seg_miou(image, np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="prompt"):
        fill_colour_error(image, image, "a red ball")
