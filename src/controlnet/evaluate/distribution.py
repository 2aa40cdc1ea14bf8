"""Image quality as a distribution distance: KID on the built-in world's own image statistics.

FID and KID compare the distribution of generated images with real ones in the feature space of a network
(Inception-v3). No such network ships inside a package (torch-fidelity, pytorch-fid and clean-fid download their
weights on first use), and none was trained on the world's images, so the features here are the world's own
statistics, each in [0, 1], describing what its images are made of:

    colour    a joint RGB histogram, 4 bins per channel (64 values, summing to 1): which colours, how much of each
    layout    the mean colour of each cell of a 4x4 grid (48 values): where the colours are
    edges     a histogram of the Sobel gradient magnitude of the luma in octaves (9 values, summing to 1): flat
              areas, noise and grain, soft and hard edges fall in different bins

Each block is scaled to a norm of at most 1 (the layout by 1 / sqrt(48)), so that no block outweighs the others in
the kernel's dot products.

KID (Binkowski et al., "Demystifying MMD GANs", ICLR 2018, Sec. 2.3 and App. D): the unbiased estimate of the squared
maximum mean discrepancy with the polynomial kernel k(x, y) = (x . y / d + 1)^3, averaged over random subsets of the
two sets (its standard deviation over the subsets beside it). Unlike FID it is unbiased, so small sets (tens of
images) can be compared; 0 means the same distribution, and two independent draws of the same set scatter around 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from controlnet.evaluate.common import check_image

COLOUR_BINS = 4  # per channel: 64 joint bins
LAYOUT_GRID = 4  # cells per side
# |gx| + |gy| of a 3x3 Sobel on 0-255 luma (at most 2040): octaves from flat (< 4) to hard edges (>= 512)
EDGE_OCTAVES = np.array([0.0, 4, 8, 16, 32, 64, 128, 256, 512, np.inf])
KID_SUBSETS = 50


def world_features(image: np.ndarray) -> np.ndarray:
    """(121,) float64 features in [0, 1] of one (H, W, 3) uint8 image: colour histogram, layout, edges."""
    check_image(image, "image")
    h, w, _ = image.shape
    bins = (image // (256 // COLOUR_BINS)).reshape(-1, 3).astype(np.int64)  # (N, 3) in [0, 4)
    codes = (bins[:, 0] * COLOUR_BINS + bins[:, 1]) * COLOUR_BINS + bins[:, 2]
    colour = np.bincount(codes, minlength=COLOUR_BINS**3) / len(codes)
    layout = cv2.resize(image, (LAYOUT_GRID, LAYOUT_GRID), interpolation=cv2.INTER_AREA).reshape(-1) / 255.0
    layout = layout / np.sqrt(layout.size)
    luma = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    magnitude = np.abs(cv2.Sobel(luma, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(luma, cv2.CV_32F, 0, 1))
    edges = np.histogram(magnitude, bins=EDGE_OCTAVES)[0] / magnitude.size
    return np.concatenate([colour, layout, edges]).astype(np.float64)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 of feature sets x (m, d) and y (n, d) with KID's cubic polynomial kernel."""
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def kid(
    images: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    subsets: int = KID_SUBSETS,
    subset_size: int | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean, standard deviation) of KID between `images` and `reference` (uint8 (H, W, 3) each, >= 2 per set) over
    `subsets` random subsets of `subset_size` drawn from each set (default: half the smaller set, so that the
    subsets differ and their spread says how much the number moves with the draw)."""
    if len(images) < 2 or len(reference) < 2:
        raise ValueError(f"kid: got {len(images)} and {len(reference)} images; expected at least 2 in each set")
    x = np.stack([world_features(im) for im in images])
    y = np.stack([world_features(im) for im in reference])
    size = min(subset_size or max(2, min(len(x), len(y)) // 2), len(x), len(y))
    rng = np.random.default_rng(seed)
    values = [
        _mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))
