import cv2
import numpy as np
import pytest

from controlnet.world.conditions import CONDITIONS, decode_normal_map
from controlnet.world.fill import COLOURS
from controlnet.world.pose import PoseAngles, draw_openpose, skeleton
from controlnet.world.render import draw_scene
from controlnet.world.scene import WORLD_VOCABULARY, Scene, SceneObject, caption
from controlnet.world.scene_sample import render_scene, scene_sample

# Written out here (not imported) so that the tests check the package's constants too.
OPENPOSE = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170),
]  # fmt: skip
ADE = {"wall": (120, 120, 120), "floor": (80, 50, 50), "person": (150, 5, 61), "box": (0, 255, 20),
       "ball": (255, 0, 163), "pyramid": (112, 224, 255)}  # fmt: skip


def one(kind, x=32.0, ground=58.0, colour="red", size="big", aspect=1.0, pose=None, background="white"):
    obj = SceneObject(kind, colour, size, x, ground, aspect, pose)
    return Scene(size=64, background=background, objects=(obj,))


def test_scene_sample_is_deterministic_and_complete():
    a, b = scene_sample(5), scene_sample(5)
    assert a.prompt == b.prompt and np.array_equal(a.image, b.image)
    assert set(a.conditions) == set(CONDITIONS) == {"canny", "lines", "scribble", "pose", "seg", "depth", "normal"}
    for name in CONDITIONS:
        assert np.array_equal(a.conditions[name], b.conditions[name]), name
        assert a.conditions[name].shape == (64, 64, 3) and a.conditions[name].dtype == np.uint8
    assert not np.array_equal(scene_sample(6).image, a.image)


def test_captions_use_the_vocabulary_and_name_objects_left_to_right():
    for seed in range(50):
        s = scene_sample(seed)
        assert set(s.prompt.split()) <= set(WORLD_VOCABULARY), s.prompt
        scene = s.info["scene"]
        positions = [s.prompt.index(f" {o.colour}") for o in sorted(scene.objects, key=lambda o: o.x)]
        assert len(s.prompt.split(" and ")) == len(scene.objects)
        assert s.prompt.endswith(f"on a {scene.background} background")
        assert all(o.colour != scene.background for o in scene.objects)
        assert positions == sorted(positions) or len(set(o.colour for o in scene.objects)) < len(scene.objects)
    scene = Scene(
        64, "green", (SceneObject("box", "blue", "small", 50, 60), SceneObject("ball", "red", "big", 10, 60))
    )
    assert caption(scene) == "a big red ball and a small blue box on a green background"


def test_scenes_vary_in_kinds_counts_and_occlusion():
    kinds, counts, occluded = set(), set(), 0
    for seed in range(60):
        scene = scene_sample(seed).info["scene"]
        kinds |= {o.kind for o in scene.objects}
        counts.add(len(scene.objects))
        ids = draw_scene(scene)[0].ids
        for i, obj in enumerate(scene.objects):
            alone = draw_scene(Scene(64, scene.background, (obj,)))[0].ids == 2
            occluded += bool(np.any(alone & (ids != 2 + i)))
    assert kinds == {"ball", "box", "pyramid", "person"} and counts == {1, 2, 3}
    assert occluded >= 10


def test_depth_ordering_matches_occlusion():
    """Where two objects' silhouettes overlap, the visible one stands nearer (larger ground row, smaller depth)."""
    checked = 0
    for seed in range(80):
        s = scene_sample(seed)
        scene, ids = s.info["scene"], s.truth["ids"]
        alone = [draw_scene(Scene(64, scene.background, (o,)))[0] for o in scene.objects]
        for i in range(len(alone)):
            for j in range(i + 1, len(alone)):
                overlap = (alone[i].ids == 2) & (alone[j].ids == 2) & ((ids == 2 + i) | (ids == 2 + j))
                if overlap.sum() < 4:
                    continue
                near, far = (i, j) if scene.objects[i].ground > scene.objects[j].ground else (j, i)
                assert np.all(ids[overlap] == 2 + near), (seed, i, j)
                assert s.truth["object_depths"][near] < s.truth["object_depths"][far]
                assert np.all(s.truth["depth"][overlap] < alone[far].depth[overlap])
                # the depth condition is brighter on the occluder than on the occluded object's visible part
                depth = s.conditions["depth"][..., 0].astype(int)
                if (ids == 2 + far).any():
                    assert depth[overlap].mean() > depth[ids == 2 + far].mean()
                checked += 1
    assert checked >= 20


def test_depth_map_is_near_bright():
    s = render_scene(one("ball"))
    depth = s.conditions["depth"][..., 0]
    assert depth[:10].max() == 0  # the wall is the farthest thing
    nearest = np.unravel_index(np.argmin(s.truth["depth"]), depth.shape)
    assert depth[nearest] == 255
    floor_column = depth[30:, 2].astype(int)  # the floor gets nearer (brighter) toward the bottom
    assert np.all(np.diff(floor_column) >= 0) and floor_column[-1] > floor_column[0] + 100
    ball = s.truth["ids"] == 2
    assert depth[ball].min() > depth[30, 0]  # the ball is nearer than the floor behind it
    # inverse depth ordering is exact: brighter <=> nearer
    flat_depth, flat_map = s.truth["depth"].ravel(), depth.ravel().astype(int)
    order = np.argsort(flat_depth)
    assert np.all(np.diff(flat_map[order]) <= 0)


def test_sphere_normals_point_outward():
    s = render_scene(one("ball"))
    scene = s.info["scene"]
    obj = scene.objects[0]
    ball = s.truth["ids"] == 2
    ys, xs = np.nonzero(ball)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    normal = s.truth["normal"][ball]  # (N, 3)
    outward = np.stack([xs + 0.5 - cx, -(ys + 0.5 - cy)], axis=1)  # image y grows down, normal y up
    assert np.all(normal[:, 2] > 0)
    assert np.mean(np.sum(normal[:, :2] * outward, axis=1) >= -1e-6) > 0.97
    assert np.allclose(np.linalg.norm(normal, axis=1), 1.0, atol=1e-4)
    # the decoded condition agrees with the truth, and a face toward the camera is (128, 128, 255)
    decoded = decode_normal_map(s.conditions["normal"])
    assert np.abs(decoded[ball] - normal).max() < 0.03
    assert tuple(s.conditions["normal"][2, 2]) == (128, 128, 255)
    # red = facing left: the ball's left rim is redder than its right rim
    row = int(round(cy - 0.5))
    cols = np.nonzero(ball[row])[0]
    red = s.conditions["normal"][row, :, 0].astype(int)
    assert red[cols[0]] > 200 and red[cols[-1]] < 60
    assert obj.kind == "ball"


def test_box_faces_have_distinct_normals_and_lines():
    s = render_scene(one("box", x=20.0, ground=60.0, size="small"))
    box = s.truth["ids"] == 2
    normals = np.unique(np.round(s.truth["normal"][box], 3), axis=0)
    assert len(normals) == 3  # front, top and the side facing the image centre (right, for a box on the left)
    assert any(n[0] > 0.5 for n in normals) and any(n[1] > 0.5 for n in normals)
    lines = s.conditions["lines"][..., 0] > 0
    # the front face's vertical edges are straight white lines
    cols = np.nonzero(box.any(axis=0))[0]
    left_col = lines[:, cols[0] - 1 : cols[0] + 2].any(axis=1)
    rows = np.nonzero(box[:, cols[0]])[0]
    assert left_col[rows].mean() > 0.9
    # the wall line is drawn where the wall meets the floor and nowhere inside the box's front
    assert lines[25:27, 50:].any(axis=0).all()


def test_seg_classes_match_the_masks():
    for seed in range(20):
        s = scene_sample(seed)
        seg, ids = s.conditions["seg"], s.truth["ids"]
        assert np.all(seg[ids == 0] == ADE["wall"]) and np.all(seg[ids == 1] == ADE["floor"])
        for i, obj in enumerate(s.info["scene"].objects):
            assert np.all(seg[ids == 2 + i] == ADE[obj.kind])
    assert s.truth["classes"][0, 0] == 0  # ADE20K index of "wall"


def test_pose_map_limbs_join_the_right_joints():
    angles = PoseAngles(right_arm=90, right_elbow=0, left_arm=90, left_elbow=0, right_leg=20, left_leg=20)
    keypoints = skeleton((128.0, 250.0), 200.0, angles)
    # a person facing the camera: their right is the image's left; head above neck above hips above ankles
    assert (
        keypoints[2, 0] < keypoints[1, 0] < keypoints[5, 0] and keypoints[4, 0] < keypoints[3, 0] < keypoints[2, 0]
    )
    assert keypoints[0, 1] < keypoints[1, 1] < keypoints[8, 1] < keypoints[9, 1] < keypoints[10, 1]
    assert abs(max(keypoints[10, 1], keypoints[13, 1]) - 250.0) < 1e-3
    canvas = draw_openpose([keypoints], 256)
    limbs = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13)]
    for i, (a, b) in enumerate(limbs):
        for t in (0.35, 0.65):  # away from the joints, where limbs meet
            x, y = np.round(keypoints[a] + t * (keypoints[b] - keypoints[a])).astype(int)
            expected = np.round(0.6 * np.array(OPENPOSE[i])).astype(int)
            assert np.abs(canvas[y, x].astype(int) - expected).max() <= 2, (i, (a, b), canvas[y, x], expected)
    assert canvas[5, 5].tolist() == [0, 0, 0]


def test_pose_condition_of_scenes_with_people():
    s = scene_sample(3, require_person=True)
    people = s.truth["keypoints"]
    assert people.shape[1:] == (18, 2) and len(people) == sum(o.kind == "person" for o in s.info["scene"].objects)
    pose = s.conditions["pose"]
    x, y = np.round(people[0, 1]).astype(int)  # the neck keypoint is coloured
    assert pose[y, x].max() > 0
    assert pose.sum() > 0 and scene_sample(3, require_person=True).conditions["pose"].sum() == pose.sum()
    no_people = render_scene(one("ball"))
    assert no_people.conditions["pose"].max() == 0


def _near(mask, radius):
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def _boundaries(ids):
    return (ids != np.roll(ids, 1, 0)) | (ids != np.roll(ids, 1, 1))


def test_canny_and_scribble_follow_the_object_outlines():
    for seed in range(10):
        s = scene_sample(seed)
        ids = s.truth["ids"]
        boundary = _boundaries(ids)
        boundary[0], boundary[:, 0] = False, False  # np.roll wraps around
        canny = s.conditions["canny"][..., 0] > 0
        assert canny.sum() > 10 and np.mean(_near(boundary, 1)[canny]) > 0.8
        outline = np.zeros_like(boundary)  # each object's inner boundary
        for obj_id in range(2, ids.max() + 1):
            region = (ids == obj_id).astype(np.uint8)
            outline |= (region > 0) & (cv2.erode(region, np.ones((3, 3), np.uint8)) == 0)
        scribble = s.conditions["scribble"][..., 0] > 0
        assert np.all(_near(outline, 3)[scribble])  # strokes stay within wobble + width of the outline
        assert not np.all(_near(outline, 0)[scribble])  # ... but they wobble off it
        for i in range(len(s.info["scene"].objects)):
            if (ids == 2 + i).sum() > 20:
                assert (scribble & _near(ids == 2 + i, 2)).sum() > 5


def test_scribbles_are_thick_and_wobble_by_seed():
    scene = one("box", x=30.0, ground=60.0)
    a, b = (render_scene(scene, seed, ["scribble"]).conditions["scribble"][..., 0] > 0 for seed in (1, 2))
    assert not np.array_equal(a, b)
    # thick: most stroke pixels have a stroke neighbour across the stroke (width >= 2 px)
    assert np.mean((a & np.roll(a, 1, 0)) | (a & np.roll(a, 1, 1))) / np.mean(a) > 0.6


def test_shading_keeps_named_colours_on_faces_toward_the_camera():
    s = render_scene(one("box", colour="blue", background="yellow"))
    front = (s.truth["ids"] == 2) & (s.truth["normal"][..., 2] > 0.999)
    inner = cv2.erode(front.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert inner.sum() > 20 and np.all(s.image[inner] == COLOURS["blue"])
    assert np.all(s.image[:5] == COLOURS["yellow"])


@pytest.mark.parametrize(("kwargs", "word"), [({"size": 8}, "size"), ({"conditions": ["hed"]}, "conditions")])
def test_bad_arguments_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        scene_sample(0, **kwargs)
