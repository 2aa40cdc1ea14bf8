"""OpenPose body estimation from the released weights (paper Sec. 4, "human pose"; file body_pose_model.pth).

The reference pipeline (ControlNet's `annotator/openpose/body.py`, from pytorch-openpose), re-written:
1. the BGR image is scaled so its height is 0.5 x 368 px, padded right/bottom to a multiple of 8 with
   grey 128, and fed as BGR / 256 - 0.5;
2. part heatmaps and part-affinity fields (PAFs) are upsampled x8, cropped and resized to the image;
3. part candidates are 4-neighbour maxima of the Gaussian-smoothed (sigma 3) heatmap above 0.1;
4. each limb's candidate pairs are scored by the PAF sampled at 10 points along the segment, plus a
   penalty for segments longer than half the image height; a pair needs > 80% of samples above 0.05 and
   a positive score; pairs are matched greedily by score;
5. limbs are assembled into people; people with fewer than 4 parts or mean score below 0.4 are dropped.
The people are drawn with the OpenPose conventions of `keypoints.render_pose`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from controlnet.annotate.base import Annotator
from controlnet.annotate.image import resize_for_detection
from controlnet.annotate.keypoints import NUM_BODY_POINTS, Person, render_pose, to_openpose
from controlnet.annotate.weights import load_into, load_state_dict, resolve_weights, torch_device

BODY_WEIGHTS_FILE = "body_pose_model.pth"
BOX_SIZE = 368  # network input height at scale 1
SCALE_SEARCH = (0.5,)  # the reference evaluates one scale: half the box size
STRIDE = 8  # output stride of the network
PAD_VALUE = 128  # grey padding
INPUT_DIVISOR, INPUT_OFFSET = 256.0, 0.5  # network input: BGR / 256 - 0.5
PEAK_SIGMA = 3.0  # Gaussian smoothing of heatmaps before peak picking
GAUSSIAN_TRUNCATE = 4.0  # the reference's scipy `gaussian_filter` cuts its kernel at 4 sigma
PEAK_THRESHOLD = 0.1  # reference thre1
PAF_THRESHOLD = 0.05  # reference thre2
PAF_SAMPLES = 10  # reference mid_num
PAF_MIN_FRACTION = 0.8  # share of samples that must exceed PAF_THRESHOLD
MIN_SEGMENT_NORM = 1e-3
LONG_LIMB_FRACTION = 0.5  # limbs longer than half the image height are penalised
MIN_PARTS = 4  # people with fewer parts are dropped
MIN_MEAN_SCORE = 0.4  # people whose score per part is lower are dropped
CONFIDENCE_FLOOR = 1e-3  # a found part always reads as present
# Limbs used for assembly as COCO-18 index pairs (the reference's 19 `limbSeq` pairs, 0-based), and the
# PAF channels (x, y) of each (its `mapIdx` minus the 19 heatmap channels).
ASSEMBLY_LIMBS = (
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
    (2, 16),
    (5, 17),
)
PAF_CHANNELS = (
    (12, 13),
    (20, 21),
    (14, 15),
    (16, 17),
    (22, 23),
    (24, 25),
    (0, 1),
    (2, 3),
    (4, 5),
    (6, 7),
    (8, 9),
    (10, 11),
    (28, 29),
    (30, 31),
    (34, 35),
    (32, 33),
    (36, 37),
    (18, 19),
    (26, 27),
)
NEW_PERSON_LIMBS = 17  # only the first 17 limbs may start a new person (the ear-shoulder ones may not)


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, C) float maps -> (H, W, C): area when shrinking, Lanczos when enlarging (reference smart_resize)."""
    height, width = size
    enlarging = (height + width) / float(maps.shape[0] + maps.shape[1]) >= 1
    interpolation = cv2.INTER_LANCZOS4 if enlarging else cv2.INTER_AREA
    channels = [
        cv2.resize(maps[:, :, c], (width, height), interpolation=interpolation) for c in range(maps.shape[2])
    ]
    return np.stack(channels, axis=2)


def network_maps(network, image_bgr: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 BGR -> heatmaps (H, W, 19) and PAFs (H, W, 38), averaged over SCALE_SEARCH."""
    import torch

    height, width = image_bgr.shape[:2]
    heatmaps = np.zeros((height, width, 19), np.float64)
    pafs = np.zeros((height, width, 38), np.float64)
    for scale_factor in SCALE_SEARCH:
        scale = scale_factor * BOX_SIZE / height
        scaled = resize_maps(image_bgr, (int(height * scale), int(width * scale)))  # (h, w, 3)
        pad_bottom, pad_right = -scaled.shape[0] % STRIDE, -scaled.shape[1] % STRIDE
        padded = cv2.copyMakeBorder(
            scaled, 0, pad_bottom, 0, pad_right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3
        )
        x = torch.from_numpy(padded.astype(np.float32) / INPUT_DIVISOR - INPUT_OFFSET).permute(2, 0, 1)[None]
        with torch.no_grad():
            paf_out, heat_out = network(x.to(device))  # (1, 38, h/8, w/8), (1, 19, h/8, w/8)
        for output, total in ((heat_out, heatmaps), (paf_out, pafs)):
            maps = output[0].permute(1, 2, 0).float().cpu().numpy()  # (h/8, w/8, C)
            maps = resize_maps(maps, (maps.shape[0] * STRIDE, maps.shape[1] * STRIDE))
            maps = maps[: scaled.shape[0], : scaled.shape[1]]  # drop the padding
            total += resize_maps(maps, (height, width)) / len(SCALE_SEARCH)
    return heatmaps, pafs


def gaussian_smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W) float64 Gaussian blur as scipy's `gaussian_filter` (radius int(4 sigma + 0.5), mirrored border)."""
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = taps / taps.sum()  # (2 radius + 1,)
    return cv2.sepFilter2D(image.astype(np.float64), cv2.CV_64F, kernel, kernel, borderType=cv2.BORDER_REFLECT)


def find_peaks(heatmaps: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(H, W, >=18) heatmaps -> candidates (N, 3) of (x, y, score) and, per part, its candidate ids."""
    candidates, part_ids = [], []
    for part in range(NUM_BODY_POINTS):
        raw = heatmaps[:, :, part]
        smooth = gaussian_smooth(raw, PEAK_SIGMA)
        padded = np.pad(smooth, 1)  # zeros outside, as the reference's shifted copies
        is_peak = (
            (smooth >= padded[:-2, 1:-1])
            & (smooth >= padded[2:, 1:-1])
            & (smooth >= padded[1:-1, :-2])
            & (smooth >= padded[1:-1, 2:])
            & (smooth > PEAK_THRESHOLD)
        )
        ys, xs = np.nonzero(is_peak)  # row-major order, as the reference
        start = sum(len(ids) for ids in part_ids)
        part_ids.append(np.arange(start, start + len(xs)))
        candidates += [(float(x), float(y), float(raw[y, x])) for x, y in zip(xs, ys, strict=True)]
    return np.asarray(candidates, np.float64).reshape(-1, 3), part_ids


def score_limbs(
    candidates: np.ndarray, part_ids: list[np.ndarray], pafs: np.ndarray, height: int
) -> list[np.ndarray | None]:
    """Per limb: (M, 3) matched connections (candidate id A, candidate id B, PAF score), or None."""
    connections: list[np.ndarray | None] = []
    for (part_a, part_b), (channel_x, channel_y) in zip(ASSEMBLY_LIMBS, PAF_CHANNELS, strict=True):
        ids_a, ids_b = part_ids[part_a], part_ids[part_b]
        if len(ids_a) == 0 or len(ids_b) == 0:
            connections.append(None)
            continue
        scored = []
        for i, id_a in enumerate(ids_a):
            for j, id_b in enumerate(ids_b):
                start, end = candidates[id_a, :2], candidates[id_b, :2]
                vector = end - start
                norm = max(MIN_SEGMENT_NORM, math.hypot(vector[0], vector[1]))
                direction = vector / norm
                xs = np.round(np.linspace(start[0], end[0], PAF_SAMPLES)).astype(int)
                ys = np.round(np.linspace(start[1], end[1], PAF_SAMPLES)).astype(int)
                samples = pafs[ys, xs, channel_x] * direction[0] + pafs[ys, xs, channel_y] * direction[1]
                score = samples.mean() + min(LONG_LIMB_FRACTION * height / norm - 1, 0)
                if np.count_nonzero(samples > PAF_THRESHOLD) > PAF_MIN_FRACTION * PAF_SAMPLES and score > 0:
                    scored.append((i, j, score))
        scored.sort(key=lambda item: item[2], reverse=True)
        matched, used_a, used_b = [], set(), set()
        for i, j, score in scored:
            if i not in used_a and j not in used_b:
                matched.append((ids_a[i], ids_b[j], score))
                used_a.add(i)
                used_b.add(j)
                if len(matched) >= min(len(ids_a), len(ids_b)):
                    break
        connections.append(np.asarray(matched, np.float64).reshape(-1, 3))
    return connections


def assemble_people(candidates: np.ndarray, connections: list[np.ndarray | None]) -> list[np.ndarray]:
    """Greedy OpenPose assembly: rows of 18 candidate ids (-1 = missing) + total score + part count."""
    people: list[np.ndarray] = []
    scores = candidates[:, 2] if len(candidates) else np.zeros(0)
    for limb, matched in enumerate(connections):
        if matched is None:
            continue
        part_a, part_b = ASSEMBLY_LIMBS[limb]
        for id_a, id_b, score in matched:
            found = [k for k, row in enumerate(people) if row[part_a] == id_a or row[part_b] == id_b][:2]
            if len(found) == 1:
                row = people[found[0]]
                if row[part_b] != id_b:
                    row[part_b] = id_b
                    row[-1] += 1
                    row[-2] += scores[int(id_b)] + score
            elif len(found) == 2:
                first, second = people[found[0]], people[found[1]]
                overlap = ((first[:-2] >= 0) & (second[:-2] >= 0)).any()
                if not overlap:  # two partial people joined by this limb: merge them
                    first[:-2] += second[:-2] + 1
                    first[-2:] += second[-2:]
                    first[-2] += score
                    del people[found[1]]
                else:
                    first[part_b] = id_b
                    first[-1] += 1
                    first[-2] += scores[int(id_b)] + score
            elif limb < NEW_PERSON_LIMBS:
                row = -np.ones(NUM_BODY_POINTS + 2)
                row[part_a], row[part_b] = id_a, id_b
                row[-1] = 2
                row[-2] = scores[int(id_a)] + scores[int(id_b)] + score
                people.append(row)
    return [row for row in people if row[-1] >= MIN_PARTS and row[-2] / row[-1] >= MIN_MEAN_SCORE]


def decode_people(heatmaps: np.ndarray, pafs: np.ndarray) -> list[Person]:
    """Heatmaps (H, W, 19) + PAFs (H, W, 38) -> people with (18, 3) pixel keypoints (x, y, confidence)."""
    candidates, part_ids = find_peaks(heatmaps)
    rows = assemble_people(candidates, score_limbs(candidates, part_ids, pafs, heatmaps.shape[0]))
    people = []
    for row in rows:
        body = np.zeros((NUM_BODY_POINTS, 3))
        for part in range(NUM_BODY_POINTS):
            if row[part] >= 0:
                x, y, score = candidates[int(row[part])]
                body[part] = (x, y, max(score, CONFIDENCE_FLOOR))
        people.append(Person(body))
    return people


@dataclass
class OpenPose(Annotator):
    """OpenPose body map: (H, W, 3) uint8 skeletons in the OpenPose colours, on black."""

    weights: str | None = None
    """body_pose_model.pth (or .safetensors), or a folder holding it; default: $CONTROLNET_ANNOTATORS."""
    device: str = "cpu"
    """Torch device for the network."""

    name = "openpose"

    def __post_init__(self) -> None:
        super().__post_init__()
        torch_device(self.device)  # fail before reading weights
        from controlnet.annotate.openpose_net import BodyPoseNetwork, from_released_keys

        path = resolve_weights(self.weights, BODY_WEIGHTS_FILE, self.name)
        self.network = BodyPoseNetwork()
        load_into(self.network, from_released_keys(self.network, load_state_dict(path)), path, self.name)
        self.network.to(torch_device(self.device)).eval()

    def people(self, image: np.ndarray) -> list[Person]:
        """(h, w, 3) uint8 RGB -> detected people in pixel coordinates of `image`."""
        heatmaps, pafs = network_maps(self.network, np.ascontiguousarray(image[:, :, ::-1]), self.device)
        return decode_people(heatmaps, pafs)

    def detect(self, image: np.ndarray) -> np.ndarray:
        return render_pose(self.people(image), image.shape[0], image.shape[1])

    def keypoints(self, image: np.ndarray) -> dict:
        """(H, W, C) image -> OpenPose-format JSON of the detected people, in the input's pixel coordinates."""
        rgb = self.prepare(image)  # (H, W, 3)
        small = rgb if self.detect_resolution is None else resize_for_detection(rgb, self.detect_resolution)
        scale = np.array([rgb.shape[1] / small.shape[1], rgb.shape[0] / small.shape[0], 1.0])
        people = [Person(person.body * scale) for person in self.people(small)]
        return to_openpose(people, rgb.shape[0], rgb.shape[1])
