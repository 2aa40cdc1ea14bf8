"""Small detectors and scores shared by the fidelity metrics (numpy + OpenCV only)."""

from __future__ import annotations

import cv2
import numpy as np

from controlnet.world.scene import WALL_LINE

ROW_BIN = 32  # colour quantisation (per channel) when finding the wall's and floor's dominant colours
FOREGROUND_DISTANCE = 40.0  # RGB distance from the background colour that makes a pixel foreground
WALL_SLACK_FRACTION = 1 / 32  # rows this close (/ image side) to the wall line may take either colour
MEDIAN_KERNEL = 3
KMEANS_ATTEMPTS = 3
KMEANS_SEED = 0


def check_image(image: np.ndarray, name: str) -> np.ndarray:
    """Validate an (H, W, 3) uint8 image argument; return it."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = (
            f"{image.dtype} array of shape {image.shape}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise ValueError(f"{name}: got {got}; expected an (H, W, 3) uint8 RGB image")
    return image


def check_pair(generated: np.ndarray, condition: np.ndarray) -> None:
    check_image(generated, "generated")
    check_image(condition, "condition")
    if generated.shape != condition.shape:
        raise ValueError(
            f"generated: shape {generated.shape} differs from the condition's {condition.shape}; "
            "expected images of the same size"
        )


def tolerance_px(size: int, at_64: float = 1.0) -> float:
    """A distance tolerance that is `at_64` px at 64 px and scales with the image side."""
    return at_64 * max(1.0, size / 64.0)


def _distance_to(mask: np.ndarray) -> np.ndarray:
    """(H, W) float32 Euclidean distance of every pixel to the nearest True pixel of `mask` (inf if none)."""
    if not mask.any():
        return np.full(mask.shape, np.inf, np.float32)
    return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def tolerant_f1(detected: np.ndarray, target: np.ndarray, tolerance: float) -> float:
    """F1 of two binary maps (H, W) where a pixel counts as matched within `tolerance` px of the other map.

    precision: detected pixels near a target pixel; recall: target pixels near a detected pixel (the
    boundary-F measure of contour detection benchmarks, with a distance tolerance).
    Both empty: 1.0; one empty: 0.0.
    """
    if not detected.any() and not target.any():
        return 1.0
    if not detected.any() or not target.any():
        return 0.0
    precision = float(np.mean(_distance_to(target)[detected] <= tolerance))
    recall = float(np.mean(_distance_to(detected)[target] <= tolerance))
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean maps; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def dominant_colour(pixels: np.ndarray) -> np.ndarray:
    """(3,) float32: the mean of the most populated coarse colour bin of (N, 3) uint8 pixels."""
    bins = (pixels // ROW_BIN).astype(np.int32)
    codes = bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2]  # (N,) bin id
    return pixels[codes == np.bincount(codes, minlength=512).argmax()].mean(axis=0).astype(np.float32)


def background_distance(image: np.ndarray) -> np.ndarray:
    """(H, W) float32: RGB distance of each pixel from the world's background, a wall above the wall line
    and a floor below it, each of one colour (its band's dominant colour: objects cover a minority of
    either band). Within WALL_SLACK_FRACTION of the line any blend of the two counts, so an anti-aliased
    line, or a generator that draws it a pixel off, is not foreground."""
    height = image.shape[0]
    line = int(round(WALL_LINE * height))
    slack = max(1, int(round(WALL_SLACK_FRACTION * height)))
    pixels = image.astype(np.float32)
    wall_colour = dominant_colour(image[:line].reshape(-1, 3))
    floor_colour = dominant_colour(image[line:].reshape(-1, 3))
    wall = np.linalg.norm(pixels - wall_colour, axis=-1)  # (H, W)
    floor = np.linalg.norm(pixels - floor_colour, axis=-1)
    # near the line: any blend of the two colours (an anti-aliased or slightly moved line) is background
    step = floor_colour - wall_colour
    t = np.clip((pixels - wall_colour) @ step / max(float(step @ step), 1e-6), 0.0, 1.0)  # (H, W)
    blend = np.linalg.norm(pixels - (wall_colour + t[..., None] * step), axis=-1)
    rows = np.arange(height)[:, None]
    return np.where(np.abs(rows - line) <= slack, blend, np.where(rows < line, wall, floor))


def denoise(image: np.ndarray) -> np.ndarray:
    """A 3x3 median filter: removes a generator's pixel noise, keeps region edges in place."""
    return cv2.medianBlur(image, MEDIAN_KERNEL)


def foreground_mask(image: np.ndarray, distance: float = FOREGROUND_DISTANCE, smooth: bool = True) -> np.ndarray:
    """(H, W) bool: pixels farther than `distance` from the wall or floor colour (`background_distance`),
    after `denoise` when `smooth`. Works on world images and on normal maps (constant wall/floor normals)."""
    if smooth:
        image = denoise(image)
    return background_distance(image) > distance


def kmeans_labels(features: np.ndarray, k: int) -> np.ndarray:
    """(N,) int cluster labels of (N, D) float features, deterministic (fixed OpenCV seed, k-means++)."""
    k = max(1, min(k, len(features)))
    cv2.setRNGSeed(KMEANS_SEED)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 30, 0.1)
    _, labels, _ = cv2.kmeans(
        features.astype(np.float32), k, None, criteria, KMEANS_ATTEMPTS, cv2.KMEANS_PP_CENTERS
    )
    return labels.ravel()
