"""Monocular depth (paper Sec. 4, "depth map"): DPT or Depth Anything through transformers, local folder only.

As the reference MiDaS annotator, the network's relative inverse depth (near = large) is min-max
normalised to 0..255, so near is bright, the convention every released depth ControlNet was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controlnet.annotate.base import Annotator
from controlnet.annotate.transformers_model import load_model_and_processor, resolve_folder

DEFAULT_DEPTH_FOLDER = "dpt-hybrid-midas"  # e.g. a local copy of Intel/dpt-hybrid-midas


@dataclass
class Depth(Annotator):
    """Depth map: (H, W, 3) uint8 grey, near = bright."""

    weights: str | None = None
    """Local transformers folder of a depth-estimation model (DPT, Depth Anything, ...)."""
    device: str = "cpu"
    """Torch device for the network."""

    name = "depth"

    def __post_init__(self) -> None:
        super().__post_init__()
        folder = resolve_folder(self.weights, DEFAULT_DEPTH_FOLDER, self.name)
        self.model, self.processor = load_model_and_processor("AutoModelForDepthEstimation", folder, self.device)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8 -> (h, w) float32 relative inverse depth at the image's size."""
        import torch
        from torch.nn import functional as F

        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            predicted = self.model(**inputs).predicted_depth  # (1, h', w')
        resized = F.interpolate(
            predicted[:, None].float(), size=image.shape[:2], mode="bicubic", align_corners=False
        )
        return resized[0, 0].cpu().numpy()

    def detect(self, image: np.ndarray) -> np.ndarray:
        depth = self.predict(image)  # (h, w)
        depth = depth - depth.min()
        span = float(depth.max())
        if span > 0:  # a constant prediction stays black
            depth = depth / span
        return (depth * 255.0).clip(0, 255).astype(np.uint8)
