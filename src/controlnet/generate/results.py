"""What a generation returns (`GenerationResult`), shared by the UNet pipeline (pipeline.py) and the transformer
pipeline (transformer_pipeline.py), so that outputs, PNG settings and sidecars read one type whichever base drew."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# Marks a control entry whose condition is built from `image` + `mask` (ControlNet v1.1 inpaint model: masked
# pixels -1; a union net's repaint type: 0).
INPAINT = "inpaint"


@dataclass
class GenerationResult:
    """Images plus everything needed to reproduce them."""

    images: list  # PIL images, or [] for output_type="latent"
    array: np.ndarray | torch.Tensor  # (N, H, W, 3) float in [0, 1]; latents (N, C, h, w) for output_type="latent"
    seeds: list[int]  # one per image: image k was drawn from torch.Generator().manual_seed(seeds[k])
    settings: dict = field(default_factory=dict)
    control_images: list = field(default_factory=list)  # the resized conditions, one PIL image per net
