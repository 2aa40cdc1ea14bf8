"""Condition images, init images and masks: reading, the web UI's three resize modes, tensors for the models.

A condition image c_i (paper Sec. 3.3: edges, depth, pose, segmentation, ...) enters the ControlNet as
(B, 3, H, W) floats in [0, 1] at the generated image's size. Users bring maps of any size; the resize modes are
the ones web-UI users know:
- "just_resize": stretch to the target size (aspect ratio not kept);
- "crop_and_resize": scale to cover the target, then centre-crop the overflow (nothing is distorted);
- "resize_and_pad": scale to fit inside the target, then pad the rest with black (nothing is cut).
Resampling is Lanczos, as diffusers' image processor does, so "just_resize" matches diffusers' pipelines.

Inpainting: the condition is the image in [0, 1] with masked pixels set to -1 (ControlNet v1.1 inpaint model) or
to 0, black (xinsir's union ProMax, type repaint); the pipeline picks the value per unit.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from controlnet.io.images import check_pixels, open_image
from controlnet.io.images import image_size as header_size

# In the web UI's order: its API sends these as ints 0, 1, 2 (sd-webui-controlnet's ResizeMode enum, and
# AUTOMATIC1111's img2img resize_mode, whose 3 is a latent upscale we do not have).
RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_pad")
# The web UI's label of each mode today: what infotexts, `info` and the page show.
RESIZE_DISPLAY_NAMES = {
    "just_resize": "Just Resize",
    "crop_and_resize": "Crop and Resize",
    "resize_and_pad": "Resize and Fill",
}
# Every other spelling that is read (lower case): the web UI's earlier labels, which clients and old PNGs still
# carry, and short names.
_RESIZE_ALIASES = {
    "resize": "just_resize",
    "crop": "crop_and_resize",
    "inner_fit": "crop_and_resize",
    "inner fit (scale to fit)": "crop_and_resize",
    "scale to fit (inner fit)": "crop_and_resize",
    "resize_and_fill": "resize_and_pad",
    "resize and pad": "resize_and_pad",
    "pad": "resize_and_pad",
    "outer_fit": "resize_and_pad",
    "outer fit (shrink to fit)": "resize_and_pad",
    "envelope (outer fit)": "resize_and_pad",
    **{label.lower(): name for name, label in RESIZE_DISPLAY_NAMES.items()},
}
# v1.1 inpaint ControlNet: masked pixels of its condition image carry this value (the rest is in [0, 1]).
INPAINT_MASKED_VALUE = -1.0
# xinsir's union ProMax, type repaint (id 7): masked pixels are black, 0 (xinsir6/ControlNetPlus
# promax/controlnet_union_test_inpainting.py `controlnet_img[mask > 0] = 0`; diffusers'
# StableDiffusionXLControlNetUnionInpaintPipeline example, `control_mode=[7]`).
UNION_REPAINT_MASKED_VALUE = 0.0
# Mask pixels above this (in [0, 1]) are repainted.
MASK_THRESHOLD = 0.5
RESAMPLE = Image.LANCZOS


def resize_mode(name: str | int) -> str:
    """Canonical resize-mode name from a name, any web-UI label (RESIZE_DISPLAY_NAMES and the earlier ones) or the
    web UI's int (0, 1, 2: RESIZE_MODES' order); raises ValueError naming the choices."""
    if isinstance(name, int) and not isinstance(name, bool) and 0 <= name < len(RESIZE_MODES):
        return RESIZE_MODES[name]
    key = name.strip().lower() if isinstance(name, str) else ""
    key = _RESIZE_ALIASES.get(key, key).replace("-", "_").replace(" ", "_")
    if key not in RESIZE_MODES:
        labels = ", ".join(repr(label) for label in RESIZE_DISPLAY_NAMES.values())
        raise ValueError(
            f"unknown resize mode {name!r}; expected one of {', '.join(RESIZE_MODES)} (or the web "
            f"UI's 0, 1, 2 or {labels})"
        )
    return key


def to_pil(image, what: str = "image") -> Image.Image:
    """PIL image from a path, encoded bytes, a PIL image, an (H, W[, C]) uint8 array or a (C, H, W) / (1, C, H, W)
    tensor in [0, 1]. Files and bytes are read by `open_image`, which refuses images over MAX_IMAGE_PIXELS before
    decoding and truncated or corrupt files; a PIL image over that size (opened lazily by a caller) is refused too."""
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        return open_image(image, what)
    if isinstance(image, Image.Image):
        check_pixels(*image.size, what)
        return image
    if isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim != 3:
            raise ValueError(f"{what}: expected a (C, H, W) tensor in [0, 1], got shape {tuple(image.shape)}")
        image = (tensor.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"{what}: expected a uint8 array (H, W) or (H, W, C), got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return Image.fromarray(image)
    raise ValueError(f"{what}: expected a path, PIL image, uint8 array or tensor, got {type(image).__name__}")


def image_size(image, what: str = "image") -> tuple[int, int]:
    """(width, height) of any image `to_pil` takes; a file's or bytes' header alone is read (no decoding)."""
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        return header_size(image, what)
    return to_pil(image, what).size


def resize_image(image: Image.Image, width: int, height: int, mode: str = "just_resize") -> Image.Image:
    """Resize `image` to (width, height) by one of RESIZE_MODES (see the module docstring)."""
    mode = resize_mode(mode)
    if image.size == (width, height):
        return image
    src_w, src_h = image.size
    if mode == "just_resize":
        return image.resize((width, height), resample=RESAMPLE)
    if mode == "crop_and_resize":
        scale = max(width / src_w, height / src_h)  # cover the target
        new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
        scaled = image.resize((new_w, new_h), resample=RESAMPLE)
        left, top = (new_w - width) // 2, (new_h - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    scale = min(width / src_w, height / src_h)  # fit inside the target
    new_w, new_h = min(width, max(1, round(src_w * scale))), min(height, max(1, round(src_h * scale)))
    scaled = image.resize((new_w, new_h), resample=RESAMPLE)
    canvas = Image.new(scaled.mode, (width, height))  # black
    canvas.paste(scaled, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def pil_to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [0, 1]."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(rgb, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def condition_image(image, width: int, height: int, mode: str = "just_resize") -> Image.Image:
    """A condition image of any kind as an RGB PIL image of (width, height); one already so is returned as is."""
    image = to_pil(image, "condition image")
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # before resizing: "P" maps resize by nearest
    return resize_image(rgb, width, height, mode)


def condition_tensor(image, width: int, height: int, mode: str = "just_resize") -> torch.Tensor:
    """A condition image of any kind -> (1, 3, height, width) float32 in [0, 1]."""
    return pil_to_unit_tensor(condition_image(image, width, height, mode))


def init_image_tensor(image, width: int, height: int, mode: str = "just_resize") -> torch.Tensor:
    """An img2img / inpainting source image -> (1, 3, height, width) float32 in [-1, 1]."""
    unit = pil_to_unit_tensor(resize_image(to_pil(image, "init image").convert("RGB"), width, height, mode))
    return unit * 2.0 - 1.0


def mask_tensor(mask, width: int, height: int, mode: str = "just_resize") -> torch.Tensor:
    """An inpainting mask (white = repaint) -> (1, 1, height, width) float32 of 0s and 1s."""
    gray = resize_image(to_pil(mask, "mask").convert("L"), width, height, mode)
    array = np.asarray(gray, dtype=np.float32) / 255.0
    return torch.from_numpy((array > MASK_THRESHOLD).astype(np.float32))[None, None]


def inpaint_condition(
    image_unit: torch.Tensor, mask: torch.Tensor, masked_value: float = INPAINT_MASKED_VALUE
) -> torch.Tensor:
    """An inpainting condition: image (B, 3, H, W) in [0, 1] with masked pixels set to `masked_value`
    (INPAINT_MASKED_VALUE, -1, for the v1.1 inpaint ControlNet; UNION_REPAINT_MASKED_VALUE, 0, for a union repaint)."""
    return torch.where(mask > MASK_THRESHOLD, torch.full_like(image_unit, masked_value), image_unit)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images (rounded to the nearest 8-bit value, as diffusers does)."""
    array = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]
