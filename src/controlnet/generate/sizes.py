"""Output sizes: which widths and heights a base can generate, and the size a condition image implies.

The rule is the VAE's alone: an image of W x H pixels is a latent of W/f x H/f (f = 2 ** (VAE levels - 1): 8 for
SD's VAE, 4 for the built-in one, 1 in pixel space), so W and H must be positive multiples of f, as in diffusers
(its image processor rounds to multiples of `vae_scale_factor`) and the web UI (multiples of 8 for SD). The UNet
takes any latent size: a stride-2 conv with padding 1 gives ceil(h / 2), and diffusers' UNet2DConditionModel passes
each skip's size to the upsampler when the latent is not a multiple of its total downsampling
(`forward_upsample_size`), so 600 x 400 (latent 75 x 50 -> 38 x 25 -> 19 x 13 -> 10 x 7) works. Our ControlNet's
down blocks are copies of the UNet's (paper Sec. 3.2), so its 13 residuals have the skips' shapes at any size.

A size taken from a condition image (a 4032 x 3024 phone photo) is scaled to the base's native resolution (UNet
`sample_size` x f: 512 px for SD1.5, 1024 for SDXL, 64 for the built-in model): the longer side becomes native, the
aspect is kept, each side is rounded to a multiple of f. No torch here: the CLI checks sizes before loading anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from controlnet.generate.builtin_format import BUILTIN_BASES, builtin_base_folder


@dataclass(frozen=True)
class OutputSize:
    """The size a generation will have, and where it came from."""

    width: int
    height: int
    source: tuple[int, int] | None = None  # (width, height) of the condition/init image the size was derived from
    native: int | None = None  # the base's native side in pixels, when the size was scaled to it

    def note(self, override: str = "pass width= and height= to override") -> str | None:
        """One line saying how a condition's size became the output size; None when nothing was changed."""
        if self.source is None or self.source == (self.width, self.height):
            return None
        how = f"the base's native {self.native} px, aspect kept" if self.native else "aspect kept"
        return (
            f"size {self.source[0]}x{self.source[1]} from the condition -> {self.width}x{self.height} ({how}; "
            f"{override})"
        )


def check_size(width: int | None, height: int | None, factor: int, option: str | None = None) -> None:
    """Refuse a given width/height (None = not given) that is not a positive multiple of the VAE factor.

    `option`: one setting gives both sides (training's square `data.resolution`): the message names it."""
    bad = [v for v in (width, height) if v is not None and (v < factor or v % factor)]
    if not bad:
        return
    if option is not None:
        near = sorted({max(factor, bad[0] // factor * factor), (bad[0] // factor + 1) * factor})
        subject, rule, example = f"{option}={bad[0]}", "must be a positive multiple", " or ".join(map(str, near))
    else:
        shown = " x ".join("auto" if v is None else str(v) for v in (width, height))
        subject, rule, example = (
            f"width x height = {shown}",
            "both must be positive multiples",
            f"{75 * factor} x {50 * factor}",
        )
    raise ValueError(
        f"{subject}: {rule} of {factor} (the VAE's {factor}x downscaling; any multiple works, e.g. {example})"
    )


def round_to(value: float, factor: int) -> int:
    """The multiple of `factor` nearest to `value` (at least `factor`)."""
    return max(factor, round(value / factor) * factor)


def choose_size(
    width: int | None,
    height: int | None,
    source: tuple[int, int] | None,
    native: int | None,
    factor: int,
) -> OutputSize:
    """The output size from what the user gave, the first condition's size `source` and the base's `native` side.

    Both given: used as they are (checked). One given: the other follows the source's aspect. None given: the
    source's size scaled so that its longer side is `native` (or, without a native size, rounded to the factor).
    No source: the missing sides are `native`.
    """
    check_size(width, height, factor)
    if width is not None and height is not None:
        return OutputSize(width, height)
    if source is None:
        side = native or factor
        return OutputSize(width or side, height or side)
    src_w, src_h = source
    if width is not None:
        return OutputSize(width, round_to(width * src_h / src_w, factor), source)
    if height is not None:
        return OutputSize(round_to(height * src_w / src_h, factor), height, source)
    scale = native / max(src_w, src_h) if native else 1.0
    return OutputSize(round_to(src_w * scale, factor), round_to(src_h * scale, factor), source, native)


def vae_factor_on_disk(base: str | os.PathLike) -> int | None:
    """The VAE factor of `base` from its config files alone (no weights read); None when they cannot tell.

    "builtin", "builtin-dit" and diffusers-layout folders (also those written by `world export-base`):
    `vae/config.json`. A single checkpoint file: every SD family this package reads (io/configs/*_pipeline.json) has a 4-level VAE (8x).
    """
    folder = builtin_base_folder(str(base)) if str(base) in BUILTIN_BASES else Path(base)
    if folder.is_file():
        configs = resources.files("controlnet.io").joinpath("configs")
        factors = {
            _factor(json.loads(entry.read_text())["vae"])
            for entry in configs.iterdir()
            if entry.name.endswith("_pipeline.json")
        }
        return factors.pop() if len(factors) == 1 else None
    vae_config = folder / "vae" / "config.json"
    if not vae_config.is_file():
        return None  # no VAE config (pixel space, or not a model folder): the pipeline checks after loading
    try:
        return _factor(json.loads(vae_config.read_text()))
    except (ValueError, KeyError, TypeError):
        return None  # an unreadable config is reported by the loader, in its own words


def _factor(vae_config: dict) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)
