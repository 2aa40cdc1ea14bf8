"""Region conditions: segmentation maps, depth maps and normal maps.

seg: the paper's re-segmentation IoU, with colour clustering as the segmenter: the generated image is
     clustered by colour and position, each cluster takes the condition class it mostly covers, and the
     mean IoU over the condition's classes is reported.
depth, normal: object silhouettes. The world's background is a wall and a floor of one colour (and one
     normal) each, and objects stand in front of them (nearer in the depth map), so objects are found in
     the generated image and in the map without a model; the silhouettes are compared (IoU). A normal
     map cannot tell a face parallel to the wall from the wall, so such faces above the floor line are
     missed (ceiling < 1).
depth, also: layers, the depth map's object regions cut at occlusion boundaries and scored like seg, so a
     generator that paints the far object in front loses, which silhouettes alone would not notice.
"""

from __future__ import annotations

import cv2
import numpy as np

from controlnet.evaluate.common import check_pair, foreground_mask, iou, kmeans_labels

SPATIAL_WEIGHT = 0.5  # position's weight against colour in the clustering (pixel units scaled to 0-255)
EXTRA_CLUSTERS = 2  # clusters beyond the condition's segment count (shading splits surfaces)
MAX_CLUSTERS = 10
MAP_FOREGROUND_DISTANCE = 12.0  # normal maps are noise-free: a small deviation is an object
DEPTH_OBJECT_LEVELS = 2  # grey levels nearer than the row's background that make a depth-map pixel an object
DEPTH_JUMP = 12  # grey levels between neighbouring pixels of a depth map that mark an occlusion boundary
MIN_LAYER_PIXELS = 6  # smaller object regions are ignored
LAYER_MERGE_LEVELS = 10  # object regions whose median depth-map levels are this close form one layer


def _segments(condition: np.ndarray) -> tuple[np.ndarray, int]:
    """(H, W) int class label per pixel (index into the condition's distinct colours) and the class count."""
    colours, labels = np.unique(condition.reshape(-1, 3), axis=0, return_inverse=True)
    return labels.reshape(condition.shape[:2]), len(colours)


def cluster_miou(generated: np.ndarray, target: np.ndarray, num_labels: int) -> float:
    """Mean IoU over labels 0..num_labels-1 of `target` (H, W) int (-1 = ignored) of the generated image's
    colour-and-position clusters, each cluster taking the target label it mostly covers."""
    height, width = target.shape
    ys, xs = np.mgrid[:height, :width].astype(np.float32)
    scale = SPATIAL_WEIGHT * 255.0 / max(height, width)
    features = np.column_stack(
        [generated.reshape(-1, 3).astype(np.float32), xs.ravel() * scale, ys.ravel() * scale]
    )  # (H*W, 5)
    k = min(num_labels + EXTRA_CLUSTERS, MAX_CLUSTERS)
    clusters = kmeans_labels(features, k).reshape(height, width)
    scored = target >= 0
    predicted = np.full_like(target, -1)
    for cluster in np.unique(clusters):
        members = (clusters == cluster) & scored
        if members.any():
            predicted[clusters == cluster] = np.bincount(target[members], minlength=num_labels).argmax()
    return float(np.mean([iou((predicted == c) & scored, target == c) for c in range(num_labels)]))


def seg_miou(generated: np.ndarray, condition: np.ndarray) -> float:
    """Mean IoU over the condition's classes of the generated image's colour clusters, labelled by majority."""
    check_pair(generated, condition)
    target, num_classes = _segments(condition)
    return cluster_miou(generated, target, num_classes)


def depth_layers(condition: np.ndarray) -> tuple[np.ndarray, int]:
    """(H, W) int labels of a depth map's layers and their count: 0 = the background (wall and floor), then
    one label per object region bounded by depth jumps (occlusion boundaries); jump pixels and specks = -1."""
    grey = condition[..., 0].astype(np.int16)  # (H, W)
    objects = depth_objects(condition)
    jump = np.zeros_like(objects)
    jump[1:] |= np.abs(grey[1:] - grey[:-1]) > DEPTH_JUMP
    jump[:, 1:] |= np.abs(grey[:, 1:] - grey[:, :-1]) > DEPTH_JUMP
    count, components = cv2.connectedComponents((objects & ~jump).astype(np.uint8), connectivity=4)
    # one layer per depth level: pieces of one object cut apart by an occluder (or a limb in front of a
    # torso) are merged when their median levels are within LAYER_MERGE_LEVELS
    pieces = [components == c for c in range(1, count)]
    pieces = [p for p in pieces if p.sum() >= MIN_LAYER_PIXELS]
    levels = [float(np.median(grey[p])) for p in pieces]
    labels = np.where(objects, -1, 0).astype(np.int32)
    layer_levels: list[float] = []
    for piece, level in sorted(zip(pieces, levels, strict=True), key=lambda pl: pl[1]):
        if not layer_levels or level - layer_levels[-1] > LAYER_MERGE_LEVELS:
            layer_levels.append(level)
        labels[piece] = len(layer_levels)
    return labels, len(layer_levels) + 1


def depth_layer_miou(generated: np.ndarray, condition: np.ndarray) -> float:
    """Mean IoU of the generated image's colour clusters with the depth map's layers (object regions cut at
    occlusion boundaries): sensitive to which object is in front, which silhouettes alone are not."""
    check_pair(generated, condition)
    labels, count = depth_layers(condition)
    return cluster_miou(generated, labels, count)


def depth_objects(condition: np.ndarray) -> np.ndarray:
    """(H, W) bool: objects of a depth map. Everything stands in front of the wall and floor behind it,
    so each row's background is its farthest (darkest) value, and objects are what is nearer."""
    grey = condition.max(axis=2).astype(np.int16)  # (H, W)
    return grey > grey.min(axis=1, keepdims=True) + DEPTH_OBJECT_LEVELS


def normal_objects(condition: np.ndarray) -> np.ndarray:
    """(H, W) bool: objects of a normal map: what differs from the wall's and floor's constant normals."""
    return foreground_mask(condition, MAP_FOREGROUND_DISTANCE, smooth=False)


def depth_silhouette_iou(generated: np.ndarray, condition: np.ndarray) -> float:
    """IoU of the objects found in the generated image with the objects of the depth map."""
    check_pair(generated, condition)
    return iou(foreground_mask(generated), depth_objects(condition))


def normal_silhouette_iou(generated: np.ndarray, condition: np.ndarray) -> float:
    """IoU of the objects found in the generated image with the objects of the normal map."""
    check_pair(generated, condition)
    return iou(foreground_mask(generated), normal_objects(condition))
