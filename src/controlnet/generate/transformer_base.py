"""Transformer bases (SD3 / SD3.5 MMDiT, Flux) as diffusers folders: told apart, checked and loaded for the one loader.

`generate/base.py` is the one base loader (docs/architecture.md#transformer-bases-are-the-same-idea); this module is
what a transformer base adds to it, so that base.py stays the UNet's reader and dispatches here:
- `transformer_arch(index)`: "sd3" | "flux" from a folder's model_index.json (the pipeline class it names, else its
  `transformer` component's class), None for a UNet base;
- `check_transformer_folder`: the components a generation needs, from model_index.json alone (no weights read);
- `transformer_family`: the base's `io.formats.Family` from transformer/config.json, so that a UNet ControlNet, or a
  Flux net on an SD3 base, is refused in one line before any weights are read (`check_controlnet_families`);
- `load_transformer_folder`: every component through its library's `from_pretrained` (offline), each loaded in
  the dtype of its own files unless a dtype is asked for: a bf16 transformer never passes through float32.

Single-file SD3 / Flux checkpoints are not read yet: `refuse_transformer_file` names them in one line.
"""

from __future__ import annotations

import importlib
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from controlnet.errors import CheckpointError
from controlnet.generate.builtin_format import SamplingDefaults

logger = logging.getLogger(__name__)

# The pipelines whose folders hold a transformer base, and the family each is.
PIPELINE_ARCH = {
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3ControlNetPipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxControlNetPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
}
TRANSFORMER_ARCH = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
ARCH_NAMES = {"sd3": "an SD3/SD3.5 (MMDiT) base", "flux": "a Flux base"}
# Components a transformer base may hold, in its diffusers pipeline's constructor terms; the required ones per family
# (SD3 runs without its T5 encoder, with a quality cost on long prompts: diffusers then feeds zeros in its place).
TRANSFORMER_COMPONENTS = (
    "transformer",
    "vae",
    "scheduler",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "text_encoder_3",
    "tokenizer_3",
)
REQUIRED = {
    "sd3": ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "flux": ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
}
# Sampling defaults of the families' reference pipelines (diffusers' StableDiffusion3Pipeline / FluxPipeline
# docstrings and model cards: SD3 28 steps at CFG 7; Flux dev 28 steps at embedded guidance 3.5; a Flux base without
# a guidance embedding (schnell) 4 steps, guidance unused).
SAMPLING = {
    "sd3": SamplingDefaults(guidance_scale=7.0, steps=28),
    "flux": SamplingDefaults(guidance_scale=3.5, steps=28),
    "flux-schnell": SamplingDefaults(guidance_scale=0.0, steps=4),
}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass
class TransformerBase:
    """A locked SD3 / Flux base: diffusers' transformer, VAE and scheduler, transformers' text encoders.

    SD3: text_encoder / text_encoder_2 are CLIP-L / CLIP-G (with projection), text_encoder_3 the T5 (or None);
    Flux: text_encoder is CLIP-L (pooled vector), text_encoder_2 the T5.
    """

    arch: str  # "sd3" | "flux"
    transformer: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    text_encoder: torch.nn.Module
    tokenizer: object
    text_encoder_2: torch.nn.Module
    tokenizer_2: object
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: object | None = None
    name: str = "custom"
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    ema: bool | None = None  # as BaseComponents.ema: a folder holds one transformer

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser, under the name the UNet bases' callers use (`load_controlnet(path, unet=...)` takes it)."""
        return self.transformer

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD3's and Flux's VAEs), as diffusers' pipelines compute it."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """What output sides must be a multiple of: the VAE factor times the patch (SD3) or the 2x2 packing (Flux)."""
        patch = 2 if self.arch == "flux" else self.transformer.config.patch_size
        return self.vae_scale_factor * patch

    @property
    def native_size(self) -> int:
        """The side in pixels the base was trained at (1024 for SD3 and Flux: diffusers' default_sample_size)."""
        sample = self.transformer.config.get("sample_size") if self.arch == "sd3" else None
        return int(sample or 128) * self.vae_scale_factor

    def text_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]

    def modules(self) -> list[torch.nn.Module]:
        return [self.transformer, self.vae, *self.text_modules()]


def transformer_arch(index: dict) -> str | None:
    """ "sd3" | "flux" for a model_index.json of a transformer base, None otherwise (a UNet base)."""
    arch = PIPELINE_ARCH.get(index.get("_class_name", ""))
    if arch is None and isinstance(index.get("transformer"), list):
        arch = TRANSFORMER_ARCH.get(index["transformer"][1])
    return arch


def check_transformer_folder(path: Path, index: dict, arch: str) -> list[str]:
    """The components loading will go through, from model_index.json and the files' presence (no weights read)."""
    present = [n for n in TRANSFORMER_COMPONENTS if _entry(index, n) is not None]
    missing = [n for n in REQUIRED[arch] if n not in present or not (path / n).is_dir()]
    if missing:
        raise ValueError(f"{path}: the {ARCH_NAMES[arch]} folder lacks {', '.join(missing)}")
    if arch == "sd3" and "text_encoder_3" not in present:
        logger.warning(
            "%s: no T5 text encoder (text_encoder_3): SD3 runs on its CLIP encoders alone, with zeros in T5's place; "
            "long or detailed prompts follow less well",
            path,
        )
    return present


def transformer_family(path: Path, arch: str):
    """The base's `io.formats.Family` from transformer/config.json (None when it is unreadable: the loader reports)."""
    from controlnet.io.formats import family_of_transformer_config

    try:
        config = json.loads((path / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    family = family_of_transformer_config(config)
    assert family.arch == arch, (family, arch)
    return family


def refuse_transformer_file(path: Path, arch: str, flag: str) -> None:
    """One line for an SD3 / Flux single file given as a base: not read yet (a diffusers folder is)."""
    raise ValueError(
        f"{flag} {path}: {ARCH_NAMES[arch]} as one checkpoint file is not supported yet; give its diffusers folder "
        "(model_index.json, transformer/, vae/, text encoders and tokenizers)"
    )


def transformer_sampling(path: Path, arch: str) -> SamplingDefaults:
    """The family's sampling defaults; a Flux base without a guidance embedding (schnell) has its own."""
    if arch == "flux":
        try:
            config = json.loads((path / "transformer" / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        if not config.get("guidance_embeds"):
            return SAMPLING["flux-schnell"]
    return SAMPLING[arch]


# Key fragments of SD3 / Flux checkpoint files (Stability's and BFL's names, with or without a prefix).
FILE_KEYS = {"joint_blocks.": "sd3", "double_blocks.": "flux"}


def transformer_file_arch(path: Path) -> str | None:
    """ "sd3" | "flux" for a .safetensors file holding an SD3 / Flux transformer (its header only), else None."""
    if path.suffix != ".safetensors":
        return None
    header = _header(path)
    if header is None:
        return None  # not a readable safetensors file: the single-file reader says so in its own words
    for key in header:
        if "controlnet_blocks" in key or "input_hint_block" in key:
            return None  # a ControlNet (XLabs' files hold double_blocks too): io's readers refuse it as a base
    for key in header:
        for fragment, arch in FILE_KEYS.items():
            if fragment in key:
                return arch
    return None


def _header(path: Path) -> dict | None:
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                return None
            return json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return None


def files_dtype(folder: Path) -> torch.dtype | None:
    """The floating dtype of a component's weights, from the first .safetensors header in `folder` (None: none)."""
    for file in sorted(folder.glob("*.safetensors")):
        for key, entry in (_header(file) or {}).items():
            if key != "__metadata__" and entry["dtype"] in SAFETENSORS_DTYPES:
                return SAFETENSORS_DTYPES[entry["dtype"]]
    return None


def load_transformer_folder(
    path: Path,
    arch: str,
    components: list[str],
    name: str,
    dtype: torch.dtype | None,
    device: str | torch.device,
    step: Callable[[str], None],
) -> TransformerBase:
    """Every component of a transformer base's folder, offline, in eval mode with no gradients, on `device`.

    dtype None: each module in the dtype its files hold (no float32 detour for a bf16 transformer); else `dtype`.
    """
    index = json.loads((path / "model_index.json").read_text())
    parts: dict = {}
    for component in components:
        step(component)
        library, class_name = _entry(index, component)
        loader = getattr(importlib.import_module(library), class_name)
        kwargs: dict = {"local_files_only": True}
        if isinstance(loader, type) and issubclass(loader, torch.nn.Module):
            kwargs["torch_dtype" if library == "diffusers" else "dtype"] = (
                dtype or files_dtype(path / component) or torch.float32
            )
        try:
            parts[component] = loader.from_pretrained(str(path / component), **kwargs)
        except (OSError, ValueError, RuntimeError, TypeError) as err:  # the libraries' words for bad files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{path / component}: cannot load the {component} ({first})") from None
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.to(device).eval().requires_grad_(False)
    sampling = SAMPLING[arch]
    if arch == "flux" and not parts["transformer"].config.get("guidance_embeds"):
        sampling = SAMPLING["flux-schnell"]
    return TransformerBase(arch=arch, name=name, sampling=sampling, **parts)


def _entry(index: dict, component: str) -> tuple[str, str] | None:
    value = index.get(component)
    if not isinstance(value, list) or len(value) != 2 or None in value:
        return None
    return value[0], value[1]
