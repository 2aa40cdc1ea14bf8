"""Region conditions: segmentation maps, depth maps and normal maps.

seg: the paper's re-segmentation IoU, with colour clustering as the segmenter: the generated image is
     clustered by colour and position, each cluster takes the condition class it mostly covers, and the
     mean IoU over the condition's classes is reported.
depth, normal: object silhouettes. The world's background (wall, floor) is constant along each row in
     the image and in both maps, so objects are what differs from their row; the silhouettes found in the
     generated image are compared with those of the condition (IoU).
"""

from __future__ import annotations

import numpy as np

from controlnet.evaluate.common import check_pair, foreground_mask, iou, kmeans_labels
from controlnet.world.palette import ADE20K_CLASSES

SPATIAL_WEIGHT = 0.5  # position's weight against colour in the clustering (pixel units scaled to 0-255)
EXTRA_CLUSTERS = 2  # clusters beyond the condition's segment count (shading splits surfaces)
MAX_CLUSTERS = 10
MAP_FOREGROUND_DISTANCE = 12.0  # depth / normal maps are noise-free: a small deviation is an object
BACKGROUND_CLASSES = ("wall", "floor")


def _segments(condition: np.ndarray) -> tuple[np.ndarray, int]:
    """(H, W) int class label per pixel (index into the condition's distinct colours) and the class count."""
    colours, labels = np.unique(condition.reshape(-1, 3), axis=0, return_inverse=True)
    return labels.reshape(condition.shape[:2]), len(colours)


def seg_miou(generated: np.ndarray, condition: np.ndarray) -> float:
    """Mean IoU over the condition's classes of the generated image's colour clusters, labelled by majority."""
    check_pair(generated, condition)
    height, width = condition.shape[:2]
    target, num_classes = _segments(condition)
    ys, xs = np.mgrid[:height, :width].astype(np.float32)
    scale = SPATIAL_WEIGHT * 255.0 / max(height, width)
    features = np.column_stack(
        [generated.reshape(-1, 3).astype(np.float32), xs.ravel() * scale, ys.ravel() * scale]
    )  # (H*W, 5)
    k = min(num_classes + EXTRA_CLUSTERS, MAX_CLUSTERS)
    clusters = kmeans_labels(features, k).reshape(height, width)
    predicted = np.zeros_like(target)
    for cluster in np.unique(clusters):
        members = clusters == cluster
        predicted[members] = np.bincount(target[members], minlength=num_classes).argmax()
    return float(np.mean([iou(predicted == c, target == c) for c in range(num_classes)]))


def seg_objects(condition: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels of a seg map whose class is not wall or floor."""
    background = np.zeros(condition.shape[:2], bool)
    for name in BACKGROUND_CLASSES:
        background |= np.all(condition == ADE20K_CLASSES[name][1], axis=-1)
    return ~background


def map_objects(condition: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels of a depth or normal map that differ from their row's background."""
    return foreground_mask(condition, MAP_FOREGROUND_DISTANCE, smooth=False)


def depth_silhouette_iou(generated: np.ndarray, condition: np.ndarray) -> float:
    """IoU of the objects found in the generated image with the objects of the depth map."""
    check_pair(generated, condition)
    return iou(foreground_mask(generated), map_objects(condition))


def normal_silhouette_iou(generated: np.ndarray, condition: np.ndarray) -> float:
    """IoU of the objects found in the generated image with the objects of the normal map."""
    check_pair(generated, condition)
    return iou(foreground_mask(generated), map_objects(condition))
