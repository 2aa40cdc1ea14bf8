"""HED soft edges from the ControlNet 1.1 weights (paper Sec. 4, "HED boundary"; file ControlNetHED.pth).

As the reference `HEDdetector`: the five side outputs are upsampled (linear) to the detect resolution,
averaged, passed through a sigmoid and scaled to 0..255; `safe=True` quantises the map as the reference's
`safe_step` (fewer grey levels, so the ControlNet cannot read hidden detail from faint edges).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from controlnet.annotate.base import Annotator
from controlnet.annotate.weights import load_into, load_state_dict, resolve_weights, torch_device

HED_WEIGHTS_FILE = "ControlNetHED.pth"
SAFE_STEPS = 2  # reference `safe_step(x, step=2)`


def safe_step(x: np.ndarray, steps: int = SAFE_STEPS) -> np.ndarray:
    """Quantise [0, 1] values to `steps` levels (reference `safe_step`: floor(x * (steps + 1)) / steps)."""
    return np.floor(x.astype(np.float32) * float(steps + 1)) / float(steps)


@dataclass
class Hed(Annotator):
    """HED soft-edge map: (H, W, 3) uint8, white on boundaries."""

    weights: str | None = None
    """ControlNetHED.pth (or .safetensors), or a folder holding it; default: $CONTROLNET_ANNOTATORS."""
    safe: bool = False
    """Quantise the map as the reference's safe mode."""
    device: str = "cpu"
    """Torch device for the network."""

    name = "hed"

    def __post_init__(self) -> None:
        super().__post_init__()
        torch_device(self.device)  # fail before reading weights
        from controlnet.annotate.hed_net import HedNetwork

        path = resolve_weights(self.weights, HED_WEIGHTS_FILE, self.name)
        self.network = HedNetwork()
        load_into(self.network, load_state_dict(path), path, self.name)
        self.network.to(torch_device(self.device)).eval()

    def detect(self, image: np.ndarray) -> np.ndarray:
        import torch

        height, width = image.shape[:2]
        with torch.no_grad():
            x = torch.from_numpy(image).float().permute(2, 0, 1)[None].to(self.device)  # (1, 3, h, w) in 0..255
            sides = [side[0, 0].float().cpu().numpy() for side in self.network(x)]  # 5 x (h / 2^i, w / 2^i)
        sides = [cv2.resize(side, (width, height), interpolation=cv2.INTER_LINEAR) for side in sides]
        edge = 1.0 / (1.0 + np.exp(-np.mean(np.stack(sides, axis=2), axis=2).astype(np.float64)))  # (h, w)
        if self.safe:
            edge = safe_step(edge)
        return (edge * 255.0).clip(0, 255).astype(np.uint8)
