"""Frozen, differentiable condition detectors for the consistency reward (train/reward.py).

ControlNet++ (Li et al., "ControlNet++: Improving Conditional Controls with Efficient Consistency Feedback",
ECCV 2024, Sec. 3.2) runs a frozen discriminative model D on the generated image x0' and penalises its distance to
the input condition c_v:   L_reward = L(c_v, D(x0')). Each detector here is such a D with its loss L, in torch so
the gradient flows through it back to the image; none has trainable weights.

    canny  soft Canny: luma, Gaussian blur, Sobel magnitude, a sigmoid step at Canny's thresholds; BCE against the
           condition's edge map (the annotator's hard thresholds and hysteresis made smooth).
    fill   the built-in world's filled-shape detector, evaluate/fill.py's metric made smooth: the metric splits the
           image into 2 colour clusters (k-means) and scores the cluster that covers the outline's enclosed region
           (IoU). Here: one soft k-means assignment step from the split the condition says (the region's and the
           background's mean colours of the image), and 1 - soft IoU with the region.
    seg    the built-in world's segmenter: the world has no learned segmenter; evaluate/regions.py clusters the image
           by colour and position and gives each cluster the class it covers. Here: one soft assignment step to
           the per-class prototypes (the image's mean colour and position in each class of the map), and the
           cross-entropy of that assignment with the map's classes.

    pose   the built-in world's body finder: evaluate/pose.py scores the image's foreground (pixels far from the
           wall's and floor's colours) against the OpenPose sticks as an F1 of precision and recall within a
           tolerance. Here: a soft foreground (a sigmoid of the colour distance at the metric's threshold, the
           wall and floor colours read from the image as the metric reads them) in the same F1, 1 - F1 the loss.

The soft-edge and line-art conditions (hed, pidinet, lineart_standard) have their annotators' own networks and
operator as detectors: train/network_detectors.py. A condition without a detector (depth, normal, lines, scribble,
...) is refused by name
(train/config.py `check_reward_detector`) before anything is loaded.

Every detector maps (images (B, 3, H, W) in [0, 1], conditions (B, C, H, W) in [0, 1]) -> loss per sample (B,).
This module lives in train/ (not annotate/) because fill and seg read their targets with evaluate/'s condition
readers, which annotate/ may not import (pyproject.toml's import contracts).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from controlnet.train.config import check_reward_detector as check_detector

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as cv2.cvtColor(RGB2GRAY) before cv2.Canny
BLUR_SIGMA = 1.0  # px: the soft edges' Gaussian pre-blur (in place of the metric's 3x3 median denoise)
BLUR_RADIUS = 2
# cv2.Canny's thresholds (100, 200 on 0-255 images; annotate/canny.py's defaults) on the unnormalised 3x3 Sobel
# response: the soft step sits between them, its width a quarter of the gap.
CANNY_LOW, CANNY_HIGH = 100.0 / 255.0, 200.0 / 255.0
EDGE_STEP = (CANNY_LOW + CANNY_HIGH) / 2
EDGE_WIDTH = (CANNY_HIGH - CANNY_LOW) / 4
EDGE_ON = 0.5  # a condition pixel above this (in [0, 1]) is an edge / outline pixel
# soft assignment temperature of fill and seg: squared colour distance (in [0, 1] RGB units) at which a pixel's
# weight for a prototype falls by e; 0.1 apart in each channel is 0.03
ASSIGN_TEMPERATURE = 0.01
SEG_SPATIAL_WEIGHT = 0.5  # evaluate/regions.py SPATIAL_WEIGHT: position against colour (image side = 1)
EPS = 1e-6


def detector(name: str, weights: str | None = None, device="cpu"):
    """The per-sample loss function of detector `name` (one of train/config.py REWARD_DETECTORS); the soft-edge
    and line-art ones (train/network_detectors.py) with the network's `weights` on `device`."""
    check_detector(name)
    from controlnet.train.network_detectors import EDGE_DETECTORS, edge_detector

    if name in EDGE_DETECTORS:
        return edge_detector(name, weights, device)
    return {"canny": canny_loss, "fill": fill_loss, "seg": seg_loss, "pose": pose_loss}[name]


# ----------------------------------------------------------------------------------------------------------
# canny
def _gaussian_kernel(device, dtype) -> torch.Tensor:
    x = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=device, dtype=dtype)
    k = torch.exp(-(x**2) / (2 * BLUR_SIGMA**2))
    k = k / k.sum()
    return (k[:, None] * k[None, :])[None, None]  # (1, 1, K, K)


def soft_edges(images: torch.Tensor) -> torch.Tensor:
    """Soft Canny edges (B, 1, H, W) in (0, 1) of images (B, 3, H, W) in [0, 1]: luma, blur, Sobel magnitude
    (cv2's L1 norm |gx| + |gy|, smoothed at 0), sigmoid((m - EDGE_STEP) / EDGE_WIDTH)."""
    luma = torch.tensor(LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    gray = (images * luma).sum(dim=1, keepdim=True)  # (B, 1, H, W)
    gray = F.conv2d(F.pad(gray, [BLUR_RADIUS] * 4, mode="replicate"), _gaussian_kernel(gray.device, gray.dtype))
    sobel_x = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=images.device, dtype=images.dtype)
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None]  # (2, 1, 3, 3)
    g = F.conv2d(F.pad(gray, [1] * 4, mode="replicate"), kernels)  # (B, 2, H, W)
    magnitude = torch.sqrt(g**2 + EPS).sum(dim=1, keepdim=True)  # ~ |gx| + |gy|
    return torch.sigmoid((magnitude - EDGE_STEP) / EDGE_WIDTH)


def canny_loss(images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """BCE (B,) between the soft edges of `images` and the condition's edge map (its max over channels)."""
    edges = soft_edges(images.float()).clamp(EPS, 1 - EPS)
    target = (conditions.float().amax(dim=1, keepdim=True) > EDGE_ON).float()
    return F.binary_cross_entropy(edges, target, reduction="none").flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------------------------------------
# fill
def fill_regions(conditions: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float: each outline's enclosed region (evaluate/fill.py region_from_outline; no gradient)."""
    from controlnet.evaluate.fill import region_from_outline

    maps = (conditions.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    regions = [region_from_outline(np.ascontiguousarray(m.expand(*m.shape[:2], 3).numpy())) for m in maps]
    return torch.from_numpy(np.stack(regions)).to(conditions.device, torch.float32)


def _soft_assign(features: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """One soft k-means step: prototypes = the mean feature of each label, then softmax(-d^2 / T) per pixel.
    features (B, F, N), labels (B, N) long in [0, k) -> assignment (B, k, N)."""
    onehot = F.one_hot(labels, k).permute(0, 2, 1).to(features.dtype)  # (B, k, N)
    prototypes = torch.einsum("bkn,bfn->bkf", onehot, features) / (onehot.sum(dim=2)[..., None] + EPS)  # (B, k, F)
    distance = ((features[:, None] - prototypes[..., None]) ** 2).sum(dim=2)  # (B, k, N)
    present = onehot.sum(dim=2, keepdim=True) > 0  # a label missing from a sample takes no pixel
    return torch.softmax((-distance / ASSIGN_TEMPERATURE).masked_fill(~present, float("-inf")), dim=1)


def fill_loss(images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """1 - soft IoU (B,) of the image's soft 'shape' cluster with the outline's enclosed region."""
    region = fill_regions(conditions).flatten(1)  # (B, N)
    colours = images.float().flatten(2)  # (B, 3, N)
    inside = _soft_assign(colours, region.long(), 2)[:, 1]  # (B, N): the shape cluster's weight
    intersection = (inside * region).sum(dim=1)
    union = (inside + region - inside * region).sum(dim=1)
    return 1 - intersection / (union + EPS)


# ----------------------------------------------------------------------------------------------------------
# seg
def seg_labels(conditions: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, N) long class per pixel (index into each map's distinct colours, as evaluate/regions.py reads a map),
    and the largest class count of the batch."""
    maps = (conditions.detach().float().clamp(0, 1) * 255).round().long().flatten(2)  # (B, 3, N)
    codes = (maps[:, 0] << 16) | (maps[:, 1] << 8) | maps[:, 2]  # (B, N) one integer per colour
    labels = [torch.unique(c, return_inverse=True)[1] for c in codes]
    return torch.stack(labels), int(max(int(x.max()) for x in labels) + 1)


def seg_loss(images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (B,) of the image's soft colour-and-position assignment with the segmentation map's classes."""
    b, _, h, w = images.shape
    labels, k = seg_labels(conditions)
    ys, xs = torch.meshgrid(
        torch.linspace(0, 1, h, device=images.device), torch.linspace(0, 1, w, device=images.device), indexing="ij"
    )
    position = (SEG_SPATIAL_WEIGHT * torch.stack([xs, ys]).flatten(1)).expand(b, 2, h * w)  # (B, 2, N)
    features = torch.cat([images.float().flatten(2), position], dim=1)  # (B, 5, N)
    assignment = _soft_assign(features, labels, k)  # (B, k, N)
    picked = assignment.gather(1, labels[:, None]).squeeze(1)  # (B, N)
    return -torch.log(picked + EPS).mean(dim=1)


# ----------------------------------------------------------------------------------------------------------
# pose
FOREGROUND_WIDTH = 0.03  # the soft foreground's sigmoid width, in [0, 1] RGB distance (~8 of 255)


def pose_targets(conditions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sticks, near, box), each (B, H, W) float, of OpenPose maps (no gradient), as evaluate/pose.py reads them:
    the stick pixels, the pixels within the metric's tolerance of a stick, and the figure's box with its margin."""
    import cv2

    from controlnet.evaluate.common import tolerance_px
    from controlnet.evaluate.pose import BOX_MARGIN_AT_64, POSE_TOLERANCE_AT_64

    sticks = (conditions.detach().float().amax(dim=1) > 0).cpu().numpy()  # (B, H, W)
    size = sticks.shape[1]
    near, box = np.zeros(sticks.shape, np.float32), np.zeros(sticks.shape, np.float32)
    margin, tolerance = int(round(tolerance_px(size, BOX_MARGIN_AT_64))), tolerance_px(size, POSE_TOLERANCE_AT_64)
    for k, s in enumerate(sticks):
        if not s.any():
            continue
        ys, xs = np.nonzero(s)
        box[
            k, max(0, ys.min() - margin) : ys.max() + margin + 1, max(0, xs.min() - margin) : xs.max() + margin + 1
        ] = 1
        near[k] = cv2.distanceTransform((~s).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE) <= tolerance
    return tuple(torch.from_numpy(x.astype(np.float32)).to(conditions.device) for x in (sticks, near, box))


def soft_foreground(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) in (0, 1): how far each pixel is from the wall's (above the wall line) or floor's colour, as
    evaluate/common.py background_distance reads them, without its blend band at the wall line (each band's
    dominant colour, found without gradient)."""
    from controlnet.evaluate.common import FOREGROUND_DISTANCE, dominant_colour
    from controlnet.world.scene import WALL_LINE

    b, _, h, w = images.shape
    line = int(round(WALL_LINE * h))
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    colours = [
        [dominant_colour(p[:line].reshape(-1, 3)), dominant_colour(p[line:].reshape(-1, 3))] for p in pixels
    ]
    colours = torch.from_numpy(np.asarray(colours) / 255.0).to(images.device, images.dtype)  # (B, 2, 3)
    floor_rows = (torch.arange(h, device=images.device) >= line).long()  # (H,)
    background = colours[:, floor_rows][:, :, None]  # (B, H, 1, 3)
    distance = torch.sqrt(((images.permute(0, 2, 3, 1) - background) ** 2).sum(-1) + EPS)  # (B, H, W)
    return torch.sigmoid((distance - FOREGROUND_DISTANCE / 255.0) / FOREGROUND_WIDTH)


def pose_loss(images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """1 - soft stick-figure F1 (B,): evaluate/pose.py's precision (foreground in the box near a stick) and
    recall (stick pixels with foreground within the tolerance: a max-pool over the tolerance's square) on the
    soft foreground; a map without a person: the foreground's mean (there should be none)."""
    from controlnet.evaluate.common import tolerance_px

    sticks, near, box = pose_targets(conditions)
    soft = soft_foreground(images.float())  # (B, H, W)
    foreground = soft * box
    radius = int(tolerance_px(images.shape[-1], 1.5))  # 1 at 64 px: the 3x3 square holds every offset <= 1.5 px
    reach = F.max_pool2d(foreground[:, None], 2 * radius + 1, stride=1, padding=radius)[:, 0]
    precision = (foreground * near).flatten(1).sum(1) / (foreground.flatten(1).sum(1) + EPS)
    recall = (reach * sticks).flatten(1).sum(1) / (sticks.flatten(1).sum(1) + EPS)
    f1 = 2 * precision * recall / (precision + recall + EPS)
    person = sticks.flatten(1).any(1)
    return torch.where(person, 1 - f1, soft.flatten(1).mean(1))
