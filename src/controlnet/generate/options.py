"""One description of a generation: the only place a generation setting is named.

`GenerationOptions` holds the settings of the generation as a whole, `ControlUnit` those of one ControlNet and its
condition (paper Sec. 3.4: several nets add their residuals), and `GenerationJob` is a prompt on a base with its
units and options. Every front door derives from these classes (docs/architecture.md#one-generation-one-description):
`controlnet generate`'s flags (`settings_cli.add_arguments`; help = the docstrings below), the manifest's keys, the
native API's request models (serve/native.py), the web-UI API's name table (the `webui` names below) and the web
page's form. A new setting is a new field here, with a default, bounds and a one-line docstring.

Checks that need no model happen here (`__post_init__`, `per_net`), each a ValueError naming the setting, the value
received and what was expected; checks that need the model (image count, block-scale length) happen in the pipeline
(and, for a server's jobs, in `Service.check` before queueing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from controlnet.generate.control_images import RESIZE_DISPLAY_NAMES, RESIZE_MODES, resize_mode
from controlnet.generate.guidance import CONTROL_MODES, GUESS_MODE_FORMS, ControlMode, check_window, control_mode
from controlnet.generate.samplers import canonical_sampler_name
from controlnet.settings_cli import check_bounds, setting

DEFAULT_STRENGTH_IMG2IMG = 0.75
OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class BaseParts:
    """The parts of an SD3 / Flux base that its checkpoint file lacks (the base loader's `vae`, `clip_l`, `clip_g`,
    `t5`; generate/transformer_base.py checks them before any weight is read)."""

    vae: str | None = setting(None, metavar="PATH", api=False, ui=False)
    """An SD3/Flux checkpoint file's VAE: a file (Flux's ae.safetensors) or a diffusers vae/ folder; needed when the
    file holds none (Flux), else it replaces the file's own."""
    clip_l: str | None = setting(None, metavar="DIR", api=False, ui=False)
    """An SD3/Flux checkpoint file's CLIP-L text encoder folder (config.json + weights, its tokenizer there or in
    the sibling tokenizer folder: text_encoder/ of a diffusers SD3/Flux model); needed when the file holds none."""
    clip_g: str | None = setting(None, metavar="DIR", api=False, ui=False)
    """An SD3 checkpoint file's CLIP-G text encoder folder (text_encoder_2/ of a diffusers SD3 model); needed when
    the file holds none."""
    t5: str | None = setting(None, metavar="DIR", api=False, ui=False)
    """T5-XXL text encoder folder (text_encoder_3/ of SD3, text_encoder_2/ of Flux), or its tokenizer folder alone
    when the file holds T5's weights; needed for Flux; for SD3 optional (without it long prompts follow less well)."""


@dataclass
class ControlUnit:
    """One ControlNet of a generation and its condition image."""

    model: str = setting("", flags=("--controlnet",), metavar="PATH", ui=False)
    """The ControlNet: a path or a shipped one (builtin:fill, builtin:canny, builtin:seg, builtin:pose) on the
    command line; a name from GET /v1/models on the server."""
    image: Any = setting(None, flags=("--cond",), kind=str, image=True, metavar="IMAGE", ui=False)
    """The condition image (a file on the command line, base64 on the server); none = the init image; 'inpaint' =
    the inpainting condition made from the init image and mask (masked pixels -1; 0 on a union net, whose type is
    then repaint)."""
    annotator: str | None = setting(None, flags=("--annotator",), metavar="NAME", ui=False)
    """Turn the condition image into a condition map first with this annotator (e.g. canny; none = use it as is)."""
    annotator_options: dict = setting(default_factory=dict, cli=False, ui=False)
    """The annotator's options (its fields, e.g. low_threshold for canny)."""
    scale: float = setting(1.0, ge=0, flags=("--scale", "--control-scale"), metavar="W", webui="weight")
    """Control strength: the net's residuals are multiplied by it (0 = the net is not run)."""
    start: float = setting(0.0, ge=0, le=1, flags=("--control-start",), metavar="F", webui="guidance_start")
    """Fraction of the schedule where the net starts acting (0 = the first step)."""
    end: float = setting(1.0, ge=0, le=1, flags=("--control-end",), metavar="F", webui="guidance_end")
    """Fraction of the schedule where the net stops acting (1 = the last step); outside, the net is not run."""
    mode: str = setting("balanced", choices=tuple(CONTROL_MODES), flags=("--control-mode",), webui="control_mode")
    """balanced | prompt ("My prompt is more important") | controlnet (guess mode) | cfg_resolution (paper)."""
    resize_mode: str = setting(
        "just_resize", choices=RESIZE_MODES, flags=("--cond-resize-mode",), webui="resize_mode"
    )
    """How this condition meets the output size: just_resize, crop_and_resize or resize_and_pad."""
    block_scales: list[float] | None = setting(
        None, flags=("--block-scales",), metavar="S,S,...", webui="advanced_weighting", ui=False
    )
    """Per-output scales, one per output of the net (13 for SD1.5, 10 for SDXL)."""
    control_type: str | None = setting(None, flags=("--control-type",), metavar="TYPE", webui="union_control_type")
    """A union ControlNet's condition type (xinsir's Union/ProMax): openpose, depth, hed/scribble/softedge,
    canny/lineart/mlsd, normal, segment, tile, repaint, the web UI's names (Hard Edge, Soft Edge, ...) or an id; none =
    from the unit's annotator. Plain ControlNets take none."""

    def __post_init__(self):
        check_bounds(self)
        self.resize_mode = resize_mode(self.resize_mode)
        self.mode = control_mode(self.mode).name
        if self.control_type is not None:
            self.control_type = str(self.control_type).strip()
            if self.control_type.lower() in NO_CONTROL_TYPE:  # the web UI's "Unknown": no type named
                self.control_type = None
        if self.annotator is not None and self.annotator.lower() == "none":
            self.annotator = None
        if self.block_scales is not None:
            self.block_scales = [float(b) for b in self.block_scales]
        check_window(self.start, self.end, "control window (start, end)")


@dataclass
class NetOptions:
    """The settings of one ControlNet as the denoising loop reads them (mode resolved)."""

    scale: float
    start: float
    end: float
    mode: ControlMode
    block_scales: list[float] | None
    control_type: str | None = None  # a union net's condition type, as given (resolved against the net)


# The pipeline's Python API spells the units' settings as lists over the nets (`pipe(..., control_scale=[1, 0.5])`,
# docs/architecture.md#public-api); a job fills these from its units.
UNIT_LISTS = {
    "control_scale": "scale",
    "control_start": "start",
    "control_end": "end",
    "control_mode": "mode",
    "block_scales": "block_scales",
    "control_type": "control_type",
}
# What the web UIs send for "no union type" (sd-webui-controlnet's ControlNetUnionControlType.UNKNOWN; ComfyUI's auto)
NO_CONTROL_TYPE = ("", "unknown", "auto", "none")
PYTHON_ONLY = {"cli": False, "api": False, "ui": False}


@dataclass
class GenerationOptions:
    """How to generate. The per-net fields (control_*) take one value for every net or a list with one per net."""

    negative_prompt: str | Sequence[str] | None = setting(None, kind=str, webui="negative_prompt", ui=False)
    """What to steer away from (the unconditional branch of CFG); none = "" (SDXL: zeros, as diffusers)."""
    guidance_scale: float | None = setting(
        None, ge=0, flags=("--cfg", "--guidance-scale"), webui="cfg_scale", ui=False
    )
    """Classifier-free guidance scale; 1 turns CFG off (one branch, half the work); none = the base's default."""
    true_cfg_scale: float = setting(1.0, ge=1, flags=("--true-cfg",), metavar="S")
    """Flux only: true classifier-free guidance with the negative prompt (none = ""), a second transformer pass per
    step, as diffusers' FluxPipeline `true_cfg_scale`; 1 = off (guidance_scale is then Flux's embedded guidance)."""
    steps: int | None = setting(None, ge=1, webui="steps", ui=False)
    """Sampler steps (img2img runs the last `strength` fraction of them); none = the base's default."""
    seed: int = setting(0, ge=0, webui="seed", ui=False)
    """Image k of the batch is drawn from torch.Generator().manual_seed(seed + k), on any device."""
    batch_size: int = setting(1, ge=1, webui="batch_size", ui=False)
    """Images per prompt."""
    width: int | None = setting(None, webui="width", ui=False)
    """Output width in pixels, a multiple of the VAE factor (8 for SD, 4 for the built-in base); none = the first
    condition's aspect at the base's native size (its longer side 512 px for SD1.5, 1024 for SDXL)."""
    height: int | None = setting(None, webui="height", ui=False)
    """Output height in pixels (as width)."""
    resize_mode: str = setting("just_resize", choices=RESIZE_MODES, webui="resize_mode")
    """How the init image, mask and (unless a unit says otherwise) conditions meet the output size: just_resize,
    crop_and_resize or resize_and_pad."""
    scheduler: str | None = setting(None, metavar="NAME", webui="sampler_name", ui=False)
    """Sampler: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, unipc (or their web-UI names); none = the base's."""
    eta: float = setting(0.0, ge=0, le=1, webui="eta")
    """DDIM's eta (0 = deterministic, 1 = as much noise as DDPM)."""
    clip_skip: int = setting(0, ge=0, webui="override_settings.CLIP_stop_at_last_layers")
    """Take the text encoder's hidden states this many layers before the last (SD1.x/2.x)."""
    guess_mode_form: str = setting("reference", choices=GUESS_MODE_FORMS)
    """Soft scales of the prompt/controlnet modes: 'reference' (0.825 ** (12 - i), the original code) or
    'diffusers' (logspace(-1, 0, 13))."""
    image: Any = setting(None, kind=str, image=True, api_name="init_image", webui="init_images", ui=False)
    """img2img / inpainting source image (a file on the command line, base64 on the server)."""
    mask: Any = setting(None, kind=str, image=True, webui="mask", ui=False)
    """Inpainting mask, white = repaint (needs an image)."""
    strength: float | None = setting(None, gt=0, le=1, webui="denoising_strength", ui=False)
    """img2img: fraction of the schedule re-run from the noised image, in (0, 1]; none = 0.75 (inpainting 1)."""
    inpaint_paste: bool = setting(False)
    """Inpainting: paste the source image's pixels back outside the mask after decoding (the VAE round trip
    otherwise alters them slightly); off by default, as diffusers."""
    output_type: str = setting("pil", choices=OUTPUT_TYPES, **PYTHON_ONLY)
    """pil (images + arrays), np (arrays only) or latent."""
    control_scale: float | Sequence[float] = setting(1.0, **PYTHON_ONLY)
    """Python API: each ControlNet's strength (ControlUnit.scale), one value or one per net."""
    block_scales: Sequence | None = setting(None, **PYTHON_ONLY)
    """Python API: per-output scales (ControlUnit.block_scales), one list for every net or one per net."""
    control_start: float | Sequence[float] = setting(0.0, **PYTHON_ONLY)
    """Python API: where each net starts acting (ControlUnit.start), one value or one per net."""
    control_end: float | Sequence[float] = setting(1.0, **PYTHON_ONLY)
    """Python API: where each net stops acting (ControlUnit.end), one value or one per net."""
    control_mode: str | Sequence[str] = setting("balanced", **PYTHON_ONLY)
    """Python API: each net's control mode (ControlUnit.mode), one value or one per net."""
    control_type: str | int | Sequence | None = setting(None, **PYTHON_ONLY)
    """Python API: each union net's condition type (ControlUnit.control_type), one value or one per net."""

    def __post_init__(self):
        check_bounds(self)
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={self.output_type!r}; expected one of {OUTPUT_TYPES}")
        if self.guess_mode_form not in GUESS_MODE_FORMS:
            raise ValueError(f"guess_mode_form={self.guess_mode_form!r}; expected one of {GUESS_MODE_FORMS}")
        if self.scheduler is not None:
            self.scheduler = canonical_sampler_name(self.scheduler)
        self.resize_mode = resize_mode(self.resize_mode)
        if self.inpaint_paste and self.mask is None:
            raise ValueError("inpaint_paste needs a mask (and an image) to paste around")
        if self.mask is not None and self.image is None:
            raise ValueError("mask given without image: inpainting needs the image to repaint")
        if self.strength is None:
            self.strength = DEFAULT_STRENGTH_IMG2IMG if (self.image is not None and self.mask is None) else 1.0

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance is on (two branches per step)."""
        return self.guidance_scale is not None and self.guidance_scale > 1.0

    def with_defaults(self, sampling) -> GenerationOptions:
        """A copy with steps, guidance scale and sampler left as none taken from the base's SamplingDefaults."""
        filled = {}
        if self.steps is None:
            filled["steps"] = sampling.steps
        if self.guidance_scale is None:
            filled["guidance_scale"] = sampling.guidance_scale
        if self.scheduler is None and sampling.scheduler is not None:
            filled["scheduler"] = sampling.scheduler
        return dataclasses.replace(self, **filled) if filled else self

    def with_units(self, units: Sequence[ControlUnit]) -> GenerationOptions:
        """A copy whose per-net lists are the units' settings (in the units' order)."""
        lists = {key: [getattr(u, name) for u in units] for key, name in UNIT_LISTS.items()}
        if not any(u.block_scales for u in units):
            lists["block_scales"] = None
        if all(u.control_type is None for u in units):
            lists["control_type"] = None
        return dataclasses.replace(self, **lists)

    def per_net(self, n: int) -> list[NetOptions]:
        """One NetOptions per ControlNet, with every per-net list checked against `n`."""
        scales = [float(s) for s in _per_net(self.control_scale, n, "control_scale")]
        starts = [float(s) for s in _per_net(self.control_start, n, "control_start")]
        ends = [float(e) for e in _per_net(self.control_end, n, "control_end")]
        modes = [control_mode(m) for m in _per_net(self.control_mode, n, "control_mode")]
        blocks = self._block_scales(n)
        types = _per_net(self.control_type, n, "control_type")
        types = [None if t is None or str(t).strip().lower() in NO_CONTROL_TYPE else str(t) for t in types]
        for k, (scale, start, end) in enumerate(zip(scales, starts, ends, strict=True)):
            if scale < 0:
                raise ValueError(f"control_scale[{k}]={scale}: expected >= 0 (0 switches the net off)")
            check_window(start, end, f"control window of ControlNet {k}")
        return [NetOptions(*args) for args in zip(scales, starts, ends, modes, blocks, types, strict=True)]

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
                **({"control_type": o.control_type} if o.control_type is not None else {}),
            }
            for o in self.per_net(n_nets)
        ]
        for key in UNIT_LISTS:
            out.pop(key)
        return out


@dataclass
class GenerationJob:
    """One generation as every front door describes it: a prompt on a base, its ControlNet units, its options.

    No file paths in it (images are decoded PIL images); `run_job` (generate/jobs.py) runs it."""

    prompt: str = setting("", webui="prompt")
    """What to draw."""
    base: str = setting("builtin", cli=False, webui="override_settings.sd_model_checkpoint")
    """The base model: its name on the server, the --base spec on the command line."""
    units: list[ControlUnit] = field(default_factory=list)
    """One ControlNet and its condition per unit, in the pipeline's order."""
    options: GenerationOptions = field(default_factory=GenerationOptions)
    """Everything else."""

    def check(self) -> None:
        """The checks that need no model, so that a server refuses a bad job before queueing it."""
        for name, text in (("prompt", self.prompt), ("negative_prompt", self.options.negative_prompt)):
            for item in text if isinstance(text, (list, tuple)) else [text]:
                if isinstance(item, str) and not item.isascii():
                    try:
                        item.encode("utf-8")
                    except UnicodeEncodeError as err:  # a lone surrogate: the tokenizer fails on it mid-job
                        raise ValueError(
                            f"{name}: not valid Unicode text (a lone surrogate at {err.start})"
                        ) from None
        for k, unit in enumerate(self.units):
            if unit.image is None and self.options.image is None:
                raise ValueError(f"units[{k}].image: no condition image and no init image to take it from")
        self.options.with_units(self.units).per_net(len(self.units))


def _per_net(value, n: int, name: str) -> list:
    """A scalar (same for every net) or a list with one entry per net."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: got {len(value)} values for {n} ControlNets; expected one per net")
        return list(value)
    return [value] * n
