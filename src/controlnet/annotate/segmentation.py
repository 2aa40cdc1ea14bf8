"""Semantic segmentation (paper Sec. 4, "ADE20K segmentation") with a transformers model from a local folder.

Each pixel gets the argmax class of the model's logits (upsampled bilinearly to the detect resolution)
and is painted with that class's ADE20K palette colour, as the maps the released seg ControlNet was
trained on. The model must predict the 150 ADE20K classes (e.g. SegFormer or UperNet ADE20K checkpoints).
The map is resized back with nearest-neighbour interpolation so only palette colours appear.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from controlnet.annotate.ade20k import NUM_ADE20K_CLASSES, colorize
from controlnet.annotate.base import Annotator
from controlnet.annotate.transformers_model import load_model_and_processor, resolve_folder

DEFAULT_SEG_FOLDER = "upernet-convnext-small"  # e.g. a local copy of openmmlab/upernet-convnext-small


@dataclass
class Segmentation(Annotator):
    """ADE20K-coloured segmentation map: (H, W, 3) uint8, one palette colour per class."""

    weights: str | None = None
    """Local transformers folder of a semantic-segmentation model with the 150 ADE20K classes."""
    device: str = "cpu"
    """Torch device for the network."""

    name = "seg"
    output_interpolation = cv2.INTER_NEAREST

    def __post_init__(self) -> None:
        super().__post_init__()
        folder = resolve_folder(self.weights, DEFAULT_SEG_FOLDER, self.name)
        self.model, self.processor = load_model_and_processor(
            "AutoModelForSemanticSegmentation", folder, self.device
        )
        num_labels = self.model.config.num_labels
        if num_labels != NUM_ADE20K_CLASSES:
            raise ValueError(
                f"seg: the model in {folder} predicts {num_labels} classes; expected the {NUM_ADE20K_CLASSES} "
                "ADE20K classes the released seg ControlNet's palette is defined for"
            )

    def labels(self, image: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8 -> (h, w) int64 ADE20K class ids."""
        import torch
        from torch.nn import functional as F

        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            logits = self.model(**inputs).logits  # (1, 150, h', w')
        logits = F.interpolate(logits.float(), size=image.shape[:2], mode="bilinear", align_corners=False)
        return logits[0].argmax(dim=0).cpu().numpy()

    def detect(self, image: np.ndarray) -> np.ndarray:
        return colorize(self.labels(image))
