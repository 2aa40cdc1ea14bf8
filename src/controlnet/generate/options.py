"""Every control of a generation as one typed config (STYLE rule 3); `controlnet generate` mirrors its fields.

Checks that need no model happen in `__post_init__` / `per_net`, each a ValueError naming the argument, the value
received and what was expected; checks that need the pipeline (image count, sizes) happen in the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from controlnet.generate.control_images import RESIZE_DISPLAY_NAMES, resize_mode
from controlnet.generate.guidance import GUESS_MODE_FORMS, ControlMode, check_window, control_mode
from controlnet.generate.samplers import canonical_sampler_name

DEFAULT_STRENGTH_IMG2IMG = 0.75
OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class NetOptions:
    """Settings of one ControlNet in one generation."""

    scale: float
    start: float
    end: float
    mode: ControlMode
    block_scales: list[float] | None


@dataclass
class GenerationOptions:
    """How to generate. Per-net fields take one value for every net or a list with one value per net."""

    negative_prompt: str | Sequence[str] | None = None
    """What to steer away from (the unconditional branch of CFG); None = "" (SDXL: zeros, as diffusers)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale; 1 turns CFG off (one branch, half the work)."""
    steps: int = 20
    """Sampler steps (img2img runs the last `strength` fraction of them)."""
    seed: int = 0
    """Image k of the batch is drawn from torch.Generator().manual_seed(seed + k), on any device."""
    batch_size: int = 1
    """Images per prompt."""
    width: int | None = None
    """Output width in pixels, a multiple of the VAE factor; default: the first condition's aspect at the base's
    native size (generate/sizes.py)."""
    height: int | None = None
    """Output height in pixels, a multiple of the VAE factor; default: as width."""
    resize_mode: str = "just_resize"
    """How condition/init images meet the output size: just_resize, crop_and_resize, resize_and_pad."""
    control_scale: float | Sequence[float] = 1.0
    """Strength of each ControlNet (its residuals are multiplied by it); 0 = the net is not run."""
    block_scales: Sequence | None = None
    """Per-output scales (13 for SD1.5, 10 for SDXL): one list for every net, or one list (or None) per net."""
    control_start: float | Sequence[float] = 0.0
    """Fraction of the schedule where each net starts acting (0 = first step)."""
    control_end: float | Sequence[float] = 1.0
    """Fraction of the schedule where each net stops acting (1 = last step); outside, the net is not run."""
    control_mode: str | Sequence[str] = "balanced"
    """balanced | prompt ("My prompt is more important") | controlnet (guess mode) | cfg_resolution (paper)."""
    guess_mode_form: str = "reference"
    """Soft scales: 'reference' (0.825 ** (12 - i), original code) or 'diffusers' (logspace(-1, 0, 13))."""
    image: Any = None
    """img2img / inpainting source image (path, PIL, uint8 array)."""
    mask: Any = None
    """Inpainting mask, white = repaint (needs `image`)."""
    inpaint_paste: bool = False
    """Inpainting: paste the source image's pixels back outside the mask after decoding (the VAE round trip
    otherwise alters them slightly); off by default, as diffusers."""
    strength: float | None = None
    """img2img: fraction of the schedule re-run from the noised image, in (0, 1]; default 0.75 (inpainting 1)."""
    scheduler: str | None = None
    """Sampler: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, unipc; default: the base model's."""
    eta: float = 0.0
    """DDIM's eta (0 = deterministic)."""
    clip_skip: int = 0
    """Take the text encoder's hidden states this many layers before the last (SD1.x/2.x)."""
    output_type: str = "pil"
    """pil (images + arrays), np (arrays only) or latent."""

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: expected an integer >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: expected an integer >= 1")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale}: expected >= 0 (1 turns CFG off)")
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={self.output_type!r}; expected one of {OUTPUT_TYPES}")
        if self.guess_mode_form not in GUESS_MODE_FORMS:
            raise ValueError(f"guess_mode_form={self.guess_mode_form!r}; expected one of {GUESS_MODE_FORMS}")
        if self.clip_skip < 0:
            raise ValueError(f"clip_skip={self.clip_skip}: expected >= 0")
        if self.scheduler is not None:
            self.scheduler = canonical_sampler_name(self.scheduler)
        self.resize_mode = resize_mode(self.resize_mode)
        if self.inpaint_paste and self.mask is None:
            raise ValueError("inpaint_paste needs a mask (and an image) to paste around")
        if self.mask is not None and self.image is None:
            raise ValueError("mask given without image: inpainting needs the image to repaint")
        if self.strength is None:
            self.strength = DEFAULT_STRENGTH_IMG2IMG if (self.image is not None and self.mask is None) else 1.0
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(
                f"strength={self.strength}: expected 0 < strength <= 1 (fraction of the schedule re-run)"
            )

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance is on (two branches per step)."""
        return self.guidance_scale > 1.0

    def per_net(self, n: int) -> list[NetOptions]:
        """One NetOptions per ControlNet, with every per-net list checked against `n`."""
        scales = [float(s) for s in _per_net(self.control_scale, n, "control_scale")]
        starts = [float(s) for s in _per_net(self.control_start, n, "control_start")]
        ends = [float(e) for e in _per_net(self.control_end, n, "control_end")]
        modes = [control_mode(m) for m in _per_net(self.control_mode, n, "control_mode")]
        blocks = self._block_scales(n)
        for k, (scale, start, end) in enumerate(zip(scales, starts, ends, strict=True)):
            if scale < 0:
                raise ValueError(f"control_scale[{k}]={scale}: expected >= 0 (0 switches the net off)")
            check_window(start, end, f"control window of ControlNet {k}")
        return [NetOptions(*args) for args in zip(scales, starts, ends, modes, blocks, strict=True)]

    def _block_scales(self, n: int) -> list:
        value = self.block_scales
        if value is None:
            return [None] * n
        if len(value) and all(isinstance(b, (int, float)) for b in value):
            return [[float(b) for b in value]] * n  # one list shared by every net
        lists = _per_net(list(value), n, "block_scales")
        return [None if b is None else [float(x) for x in b] for b in lists]

    def describe(self, n_nets: int) -> dict:
        """JSON-able settings (images excluded) for PNG metadata and sidecars."""
        out = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("image", "mask", "output_type")
        }
        out["negative_prompt"] = self.negative_prompt or ""
        out["img2img"] = self.image is not None
        out["inpainting"] = self.mask is not None
        if self.image is None:
            out["strength"] = None
        out["resize_label"] = RESIZE_DISPLAY_NAMES[self.resize_mode]
        out["controlnets"] = [
            {
                "scale": o.scale,
                "start": o.start,
                "end": o.end,
                "mode": o.mode.name,
                "mode_label": o.mode.display_name,
                "block_scales": o.block_scales,
            }
            for o in self.per_net(n_nets)
        ]
        for key in ("control_scale", "control_start", "control_end", "control_mode", "block_scales"):
            out.pop(key)
        return out


def _per_net(value, n: int, name: str) -> list:
    """A scalar (same for every net) or a list with one entry per net."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: got {len(value)} values for {n} ControlNets; expected one per net")
        return list(value)
    return [value] * n
