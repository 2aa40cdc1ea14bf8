"""Paired transforms and aspect-ratio buckets: target and condition always get the same geometry.

A ControlNet learns a pixel-aligned mapping from condition to image (paper Sec. 3), so any resize, crop or flip
applied to the target must be applied to the condition too, or the pair is silently misaligned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# Bucket sides are multiples of this: 8 (VAE) x 8 (three UNet halvings) for SD; also valid in pixel space.
BUCKET_MULTIPLE = 64
MAX_BUCKET_ASPECT = 4.0  # widest / tallest bucket considered


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


def make_buckets(resolution: int, multiple: int = BUCKET_MULTIPLE) -> list[Bucket]:
    """Sizes with about resolution**2 pixels and sides divisible by `multiple`, square included."""
    multiple = min(multiple, resolution)
    area = resolution * resolution
    buckets = {Bucket(resolution, resolution)}
    width = multiple
    while width <= resolution * MAX_BUCKET_ASPECT:
        height = max(multiple, (area // width) // multiple * multiple)
        if 1 / MAX_BUCKET_ASPECT <= width / height <= MAX_BUCKET_ASPECT:
            buckets.add(Bucket(width, height))
        width += multiple
    return sorted(buckets, key=lambda b: b.aspect)


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to width / height (in log space)."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b.aspect) - target))


@dataclass(frozen=True)
class PairedTransform:
    """Resize (cover), crop and optionally flip a (target, condition) pair identically.

    The target becomes a float tensor (3, H, W) in [-1, 1] (the VAE's input range), the condition a float tensor
    (C, H, W) in [0, 1] (the ControlNet's input range, paper Sec. 3.2).
    """

    width: int
    height: int
    center_crop: bool = True
    random_flip: bool = False

    def geometry(self, size: tuple[int, int], rng: np.random.Generator) -> tuple[tuple[int, int], tuple, bool]:
        """(resized size, crop box, flip) for an image of `size`; the same for both images of the pair."""
        w, h = size
        scale = max(self.width / w, self.height / h)
        rw, rh = max(self.width, round(w * scale)), max(self.height, round(h * scale))
        if self.center_crop:
            left, top = (rw - self.width) // 2, (rh - self.height) // 2
        else:
            left, top = int(rng.integers(0, rw - self.width + 1)), int(rng.integers(0, rh - self.height + 1))
        flip = bool(self.random_flip and rng.random() < 0.5)
        return (rw, rh), (left, top, left + self.width, top + self.height), flip

    def __call__(
        self, target: Image.Image, condition: Image.Image, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if target.size != condition.size:
            raise ValueError(
                f"target is {target.size[0]}x{target.size[1]} but its condition is "
                f"{condition.size[0]}x{condition.size[1]}: a pair must have the same size"
            )
        resized, box, flip = self.geometry(target.size, rng)
        out = []
        for image in (target, condition):
            if image.size != resized:
                image = image.resize(resized, Image.BICUBIC)
            image = image.crop(box)
            if flip:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1))  # (3, H, W)
        target_t = out[0].float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]
        return target_t, out[1]  # condition stays uint8 (3, H, W); divided by 255 at use


def condition_to_unit(cond: torch.Tensor) -> torch.Tensor:
    """uint8 condition (B, C, H, W) -> float in [0, 1]."""
    return cond.float() / 255.0
