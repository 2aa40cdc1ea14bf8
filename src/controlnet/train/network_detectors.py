"""The reward's detectors for soft-edge and line-art conditions: the annotators' own networks and operator, in the graph.

ControlNet++ (Li et al., ECCV 2024, Sec. 3.2) runs the condition's own annotator, frozen, on the generated image and
penalises the distance of its output to the input condition. For the conditions the v1.1 ControlNets read from an
edge network or a line operator, that annotator is ours already (annotate/); here each one runs in torch with the
gradient flowing back to the image, exactly as the annotator computes its map before the final rounding to uint8:

    hed               annotate/hed.py: HED's five side outputs upsampled (bilinear) to the image, averaged, sigmoid
                      (weights ControlNetHED.pth)
    pidinet           annotate/pidinet.py: PiDiNet's fused edge probability of the BGR image in [0, 1]
                      (weights table5_pidinet.pth)
    lineart_standard  annotate/lineart.py: the difference of Gaussians that keeps dark strokes, divided by the median
                      of the clearly dark responses (found without gradient) and scaled to 127 of 255

The loss is the mean squared error (B,) between that map and the condition's grey level, both in [0, 1]. The
networks' weights are the user's (`train.reward_detector_weights`, a file or a folder, else $CONTROLNET_ANNOTATORS as
for `controlnet annotate`); nothing is downloaded. Every parameter is frozen (requires_grad False).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from controlnet.annotate.hed import HED_WEIGHTS_FILE
from controlnet.annotate.lineart import (
    DEFAULT_GAUSSIAN_SIGMA,
    DEFAULT_INTENSITY_THRESHOLD,
    LINE_GAIN,
    MIN_NORMALISER,
)
from controlnet.annotate.pidinet import PIDINET_WEIGHTS_FILE
from controlnet.annotate.weights import load_into, load_state_dict, resolve_weights

NETWORK_WEIGHTS = {"hed": HED_WEIGHTS_FILE, "pidinet": PIDINET_WEIGHTS_FILE}
EDGE_DETECTORS = (*NETWORK_WEIGHTS, "lineart_standard")
GAUSSIAN_RADIUS_SIGMAS = (
    4  # the line-art blur's kernel reaches 4 sigma each side (cv2.GaussianBlur on float images)
)


def detector_weights(name: str, weights: str | None):
    """The weights file of network detector `name` (a FileNotFoundError line when missing); None for the operator."""
    if name not in NETWORK_WEIGHTS:
        return None
    import os

    from controlnet.annotate.weights import ANNOTATORS_DIR_ENV

    field, filename = f"train.reward_detector={name}", NETWORK_WEIGHTS[name]
    if not weights and not os.environ.get(ANNOTATORS_DIR_ENV):
        raise FileNotFoundError(
            f"{field}: no weights for its network; expected a local {filename} (from lllyasviel/Annotators): pass "
            f"--train.reward_detector_weights FILE_OR_FOLDER or set ${ANNOTATORS_DIR_ENV} to its folder; nothing is "
            "downloaded"
        )
    return resolve_weights(weights or None, filename, field)


class HedEdges(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> HED soft edges (B, 1, H, W) in (0, 1) (annotate/hed.py `Hed.detect`)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        sides = [F.interpolate(s.float(), size=size, mode="bilinear") for s in self.network(images * 255.0)]
        return torch.sigmoid(torch.stack(sides).mean(dim=0))


class PidinetEdges(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> PiDiNet edges (B, 1, H, W) in [0, 1] (annotate/pidinet.py, RGB to BGR)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images.flip(1))


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of (B, C, H, W) with reflected borders (cv2's BORDER_REFLECT_101)."""
    radius = max(1, int(GAUSSIAN_RADIUS_SIGMAS * sigma + 0.5))
    radius = min(radius, min(images.shape[-2:]) - 1)  # reflection needs a border narrower than the image
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    h = F.conv2d(
        F.pad(images, (radius, radius, 0, 0), mode="reflect"),
        kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
        groups=c,
    )
    return F.conv2d(
        F.pad(h, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c
    )


def lineart_standard(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> standard line art (B, 1, H, W) in [0, 1] (annotate/lineart.py)."""
    pixels = images * 255.0
    darker = (_gaussian_blur(pixels, DEFAULT_GAUSSIAN_SIGMA) - pixels).amin(dim=1, keepdim=True).clamp(0, 255)
    normalisers = []
    for d in darker.detach():  # the median of the clearly dark responses, per image (a constant of the graph)
        strokes = d[d > DEFAULT_INTENSITY_THRESHOLD]
        median = float(strokes.float().quantile(0.5)) if strokes.numel() else MIN_NORMALISER
        normalisers.append(max(MIN_NORMALISER, median))
    normaliser = torch.tensor(normalisers, device=images.device, dtype=images.dtype).view(-1, 1, 1, 1)
    return (darker / normaliser * LINE_GAIN).clamp(0, 255) / 255.0


class EdgeMapLoss(nn.Module):
    """Per-sample MSE (B,) of an edge map of the image against the condition's grey level; frozen."""

    def __init__(self, edges):
        super().__init__()
        self.edges = edges
        if isinstance(edges, nn.Module):
            edges.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        edges = self.edges(images.float())  # (B, 1, H, W)
        target = conditions.float().mean(dim=1, keepdim=True)
        return ((edges - target) ** 2).flatten(1).mean(dim=1)


def edge_detector(name: str, weights: str | None, device: torch.device | str = "cpu") -> EdgeMapLoss:
    """The loss of detector `name` (one of EDGE_DETECTORS), its network loaded from the user's weights."""
    if name == "lineart_standard":
        return EdgeMapLoss(lineart_standard)
    path = detector_weights(name, weights)
    if name == "hed":
        from controlnet.annotate.hed_net import HedNetwork

        network, wrap = HedNetwork(), HedEdges
    else:
        from controlnet.annotate.pidinet_net import PiDiNet

        network, wrap = PiDiNet(), PidinetEdges
    load_into(network, load_state_dict(path), path, f"train.reward_detector={name}")
    return EdgeMapLoss(wrap(network)).to(device)
