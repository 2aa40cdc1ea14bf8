"""PiDiNet soft edges from the released weights (ControlNet 1.1 "softedge_pidinet"; file table5_pidinet.pth).

As the reference `PidiNetDetector`: the RGB image is flipped to BGR (the network was trained on OpenCV
images) and scaled to [0, 1]; the fused edge probability is optionally thresholded at 0.5
(`apply_filter`) or quantised (`safe`), then scaled to 0..255.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controlnet.annotate.base import Annotator
from controlnet.annotate.hed import safe_step
from controlnet.annotate.weights import load_into, load_state_dict, resolve_weights, torch_device

PIDINET_WEIGHTS_FILE = "table5_pidinet.pth"
FILTER_THRESHOLD = 0.5  # reference `apply_fliter`: edge > 0.5


@dataclass
class PiDiNetEdges(Annotator):
    """PiDiNet soft-edge map: (H, W, 3) uint8, white on boundaries."""

    weights: str | None = None
    """table5_pidinet.pth (or .safetensors), or a folder holding it; default: $CONTROLNET_ANNOTATORS."""
    safe: bool = False
    """Quantise the map as the reference's safe mode."""
    apply_filter: bool = False
    """Binarise the edge probability at 0.5."""
    device: str = "cpu"
    """Torch device for the network."""

    name = "pidinet"

    def __post_init__(self) -> None:
        super().__post_init__()
        torch_device(self.device)  # fail before reading weights
        from controlnet.annotate.pidinet_net import PiDiNet

        path = resolve_weights(self.weights, PIDINET_WEIGHTS_FILE, self.name)
        self.network = PiDiNet()
        load_into(self.network, load_state_dict(path), path, self.name)
        self.network.to(torch_device(self.device)).eval()

    def detect(self, image: np.ndarray) -> np.ndarray:
        import torch

        bgr = np.ascontiguousarray(image[:, :, ::-1])  # (h, w, 3)
        with torch.no_grad():
            x = torch.from_numpy(bgr).float().permute(2, 0, 1)[None].to(self.device) / 255.0  # (1, 3, h, w)
            edge = self.network(x)[0, 0].float().cpu().numpy()  # (h, w) in [0, 1]
        if self.apply_filter:
            edge = (edge > FILTER_THRESHOLD).astype(np.float32)
        if self.safe:
            edge = safe_step(edge)
        return (edge * 255.0).clip(0, 255).astype(np.uint8)
