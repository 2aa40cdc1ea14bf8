"""OpenPose body estimation: decoding of synthetic heatmaps/PAFs, network layout and weight loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlnet.annotate.openpose import ASSEMBLY_LIMBS, PAF_CHANNELS, decode_people

# A standing person in a 200 x 160 (H x W) image: COCO-18 part -> (x, y).
PERSON = {
    0: (80, 30), 1: (80, 50), 2: (60, 50), 3: (55, 75), 4: (52, 100), 5: (100, 50), 6: (105, 75),
    7: (108, 100), 8: (68, 110), 9: (66, 140), 10: (65, 170), 11: (92, 110), 12: (94, 140), 13: (95, 170),
    14: (75, 25), 15: (85, 25), 16: (70, 28), 17: (90, 28),
}  # fmt: skip


def synthetic_maps(people: list[dict[int, tuple[int, int]]], height: int, width: int):
    """Heatmaps with a unit Gaussian at each part; PAFs holding the limb's unit vector near each limb."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    heatmaps = np.zeros((height, width, 19))
    pafs = np.zeros((height, width, 38))
    for person in people:
        for part, (x, y) in person.items():
            heatmaps[:, :, part] = np.maximum(
                heatmaps[:, :, part], np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / 8.0)
            )
        for (a, b), (cx, cy) in zip(ASSEMBLY_LIMBS, PAF_CHANNELS, strict=True):
            (xa, ya), (xb, yb) = person[a], person[b]
            length = np.hypot(xb - xa, yb - ya)
            ux, uy = (xb - xa) / length, (yb - ya) / length
            t = ((cols - xa) * ux + (rows - ya) * uy) / length  # position along the limb
            distance = np.abs((cols - xa) * uy - (rows - ya) * ux)  # distance from the limb's line
            band = (t >= -0.05) & (t <= 1.05) & (distance <= 2.0)
            pafs[band, cx] = ux
            pafs[band, cy] = uy
    return heatmaps, pafs


def test_decoding_finds_the_person_and_every_part():
    heatmaps, pafs = synthetic_maps([PERSON], 200, 160)
    people = decode_people(heatmaps, pafs)
    assert len(people) == 1
    body = people[0].body
    for part, (x, y) in PERSON.items():
        assert body[part, :2].tolist() == [x, y]
        assert body[part, 2] == pytest.approx(1.0)


def test_decoding_separates_two_people_and_drops_fragments():
    shifted = {part: (x + 160, y) for part, (x, y) in PERSON.items()}
    fragment = {0: (280, 185), 1: (290, 190)}  # two parts only: below the 4-part minimum
    heatmaps, pafs = synthetic_maps([PERSON, shifted], 200, 320)
    for part, (x, y) in fragment.items():
        heatmaps[y, x, part] = 5.0
    people = decode_people(heatmaps, pafs)
    assert len(people) == 2
    necks = sorted(person.body[1, 0] for person in people)
    assert necks == [80, 240]
    for person in people:
        assert (person.body[:, 2] > 0).all()


def test_missing_limb_evidence_leaves_parts_unconnected():
    heatmaps, pafs = synthetic_maps([PERSON], 200, 160)
    pafs[:, :, 4:6] = 0  # channel pair of the right knee -> right ankle limb (limb 8)
    body = decode_people(heatmaps, pafs)[0].body
    assert body[10, 2] == 0  # right ankle not attached
    assert body[9, 2] > 0 and body[13, 2] > 0


def reference_body_model():
    from .reference import load_aux_module

    return load_aux_module("open_pose/model.py").bodypose_model().eval()


@pytest.mark.slow
def test_body_network_matches_the_reference_and_the_released_file_loads(tmp_path):
    from controlnet.annotate import get_annotator

    reference = reference_body_model()
    torch.manual_seed(0)
    state = {key: torch.randn(value.shape) * 0.02 for key, value in reference.state_dict().items()}
    reference.load_state_dict(state)
    # The released body_pose_model.pth names parameters without the `modelX.` prefix.
    torch.save(
        {key.split(".", 1)[1]: value.half() for key, value in state.items()}, tmp_path / "body_pose_model.pth"
    )
    annotator = get_annotator("openpose", weights=str(tmp_path), detect_resolution=64)
    reference.half().float()  # the same fp16-rounded weights on both sides
    reference.load_state_dict({k: v.half().float() for k, v in state.items()})
    x = torch.rand(1, 3, 48, 64) - 0.5
    with torch.no_grad():
        ours, theirs = annotator.network(x), reference(x)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    out = annotator(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8))
    assert out.shape == (64, 80, 3) and out.dtype == np.uint8


def test_released_key_names_map_onto_the_network():
    from controlnet.annotate.openpose_net import BodyPoseNetwork, from_released_keys

    network = BodyPoseNetwork()
    reference_keys = set(reference_body_model().state_dict())
    assert set(network.state_dict()) == reference_keys
    # The released names, written from the OpenPose prototxt: trunk, stage-1 CPM convs, stage-2..6 Mconvs.
    released = [
        "conv1_1",
        "conv4_4_CPM",
        "conv5_5_CPM_L1",
        "conv5_5_CPM_L2",
        "Mconv1_stage2_L1",
        "Mconv7_stage6_L2",
    ]
    short_state = {key.split(".", 1)[1]: value for key, value in network.state_dict().items()}
    assert {f"{name}.weight" for name in released} <= set(short_state)
    assert short_state["Mconv1_stage2_L1.weight"].shape == (128, 185, 7, 7)
    assert short_state["Mconv7_stage6_L1.weight"].shape == (38, 128, 1, 1)
    assert short_state["Mconv7_stage6_L2.weight"].shape == (19, 128, 1, 1)
    renamed = from_released_keys(network, short_state)
    assert set(renamed) == set(network.state_dict())


def test_keypoints_json_is_in_input_pixels(monkeypatch):
    from controlnet.annotate.keypoints import Person
    from controlnet.annotate.openpose import OpenPose

    pose = OpenPose.__new__(OpenPose)  # no weights: the network step is replaced below
    pose.detect_resolution, pose.device, pose.weights = 64, "cpu", None
    seen = []

    def fake_people(small):
        seen.append(small.shape)
        body = np.zeros((18, 3))
        body[1] = (32, 16, 0.9)  # neck at detect resolution
        return [Person(body)]

    monkeypatch.setattr(pose, "people", fake_people)
    document = pose.keypoints(np.zeros((128, 256, 3), np.uint8))  # detect size 64 x 128: scale 2
    assert seen == [(64, 128, 3)]
    assert document["canvas_width"] == 256 and document["canvas_height"] == 128
    assert document["people"][0]["pose_keypoints_2d"][3:6] == [64.0, 32.0, 0.9]


class FakeBodyNetwork(torch.nn.Module):
    """Returns synthetic PAFs / heatmaps on the stride-8 grid of whatever it is fed (one person)."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # the reference reads the device from a parameter

    def forward(self, x):
        grid_h, grid_w = x.shape[2] // 8, x.shape[3] // 8
        person = {part: (x0 * 0.2 + 6, y0 * 0.2 + 4) for part, (x0, y0) in PERSON.items()}
        heatmaps, pafs = synthetic_maps([person], grid_h, grid_w)
        as_tensor = lambda maps: torch.from_numpy(maps).permute(2, 0, 1)[None].float()  # noqa: E731
        return as_tensor(pafs), as_tensor(heatmaps)


def test_openpose_pipeline_equals_the_reference_body_estimator():
    import skimage.data

    from controlnet.annotate.openpose import OpenPose

    from .reference import load_aux_module

    load_aux_module("util.py")
    load_aux_module("open_pose/util.py")  # also loads open_pose/body.py
    import sys

    body_module = sys.modules["controlnet_aux.open_pose.body"]
    reference = body_module.Body.__new__(body_module.Body)
    reference.model = FakeBodyNetwork()
    image = skimage.data.astronaut()  # 512 x 512 RGB
    candidate, subset = reference(np.ascontiguousarray(image[:, :, ::-1]))  # the reference takes BGR
    assert len(subset) == 1
    expected = {part: tuple(candidate[int(index), :2]) for part, index in enumerate(subset[0][:18]) if index >= 0}
    assert len(expected) >= 10  # a real skeleton came through, not an empty match

    pose = OpenPose.__new__(OpenPose)
    pose.detect_resolution, pose.device, pose.weights, pose.network = 512, "cpu", None, FakeBodyNetwork()
    people = pose.people(image)
    assert len(people) == 1
    found = {part: tuple(people[0].body[part, :2]) for part in range(18) if people[0].body[part, 2] > 0}
    assert found == expected


@pytest.mark.parametrize("shape", [(37, 53), (5, 7)])
def test_heatmap_smoothing_equals_scipy_gaussian_filter(shape):
    ndimage = pytest.importorskip("scipy.ndimage")
    from controlnet.annotate.openpose import gaussian_smooth

    x = np.random.default_rng(0).random(shape)
    np.testing.assert_allclose(gaussian_smooth(x, 3.0), ndimage.gaussian_filter(x, sigma=3.0), atol=1e-12)
