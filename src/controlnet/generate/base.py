"""The one base loader: "builtin", a diffusers folder, an exported folder or one SD checkpoint file -> `BaseComponents`.

Generation, training, the demo and evaluation all load their locked base here, so they see the same modules, the
same tokenizer checks, the same latent space and the same sampling defaults. Four kinds of base (`base_kind`):
- "builtin": the shipped tiny model (the `weights/` folder of `controlnet.builtin`, found as package data);
- a diffusers model folder (`model_index.json` names each component's class); the spec "builtin-dit" names one,
  the shipped tiny SD3-layout transformer base (`weights_dit/`), whose BaseSource keeps the name "builtin-dit";
- an exported folder (`controlnet world export-base`): the built-in folder format, generate/builtin_format.py;
- one SD1.x/SD2.x/SDXL checkpoint file (read by `controlnet.io.single_file`; it holds no tokenizer).
A diffusers folder may hold a transformer base (SD3 / SD3.5, Flux: model_index.json names its pipeline), and so may a
single file (Stability's SD3 checkpoints, BFL's Flux transformer files: told from the header, with the parts a file
lacks given as `vae`, `clip_l`, `clip_g`, `t5`); what such a base adds (its components, family, dtype, sampling
defaults) is generate/transformer_base.py's, dispatched from here.

Arguments and files are checked first (`check_base`: cheap, no weights read), then the weights are loaded.
Nothing is downloaded (docs/architecture.md#nothing-downloaded-nothing-unpickled): every `from_pretrained` call
passes `local_files_only=True`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from controlnet.errors import CheckpointError
from controlnet.generate.builtin_format import (
    BUILTIN,
    BUILTIN_BASES,
    BUILTIN_CONTROLNET_PREFIXES,
    BUILTIN_DIT,
    EXPORTED_CONFIG,
    SamplingDefaults,
    builtin_base_folder,
    builtin_controlnets,
    builtin_folder,
    folder_classes,
)
from controlnet.generate.transformer_base import (
    PART_OPTIONS,
    FileBasePlan,
    TransformerBase,
    check_transformer_file,
    check_transformer_folder,
    load_transformer_file,
    load_transformer_folder,
    transformer_arch,
    transformer_family,
    transformer_file_arch,
    transformer_sampling,
    transformer_sampling_of_file,
)
from controlnet.io.tokenizers import load_tokenizer
from controlnet.io.transformer_files import refuse_gguf

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"  # a diffusers model folder
# Components a text-to-image base may hold, in the pipeline constructor's terms.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
# How the options are called where they come from, for error messages (library keywords by default; the CLI
# passes its flags, e.g. {"tokenizer": "--tokenizer"} or {"tokenizer": "--model.tokenizer"}).
KEYWORDS = {
    "base": "base",
    "tokenizer": "tokenizer",
    "tokenizer_2": "tokenizer_2",
    "base_config": "configs",
    "ema": "ema=True",
    "no_ema": "ema=False",
    **{name: name for name in PART_OPTIONS},  # an SD3 / Flux file's parts: vae, clip_l, clip_g, t5
}


@dataclass
class BaseComponents:
    """A locked text-to-image base: diffusers/transformers modules plus what travels with them.

    `vae` is None for a pixel-space base (images in [-1, 1] are the UNet's samples). SDXL adds `text_encoder_2`
    (with projection: the pooled embedding) and `tokenizer_2`.
    """

    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    force_zeros_for_empty_prompt: bool = True  # SDXL: the unconditional branch is zeros when no negative prompt
    name: str = "custom"
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    # which UNet of a checkpoint file holding EMA weights too was loaded: True the EMA one, False the raw one; None
    # when the base holds one UNet (io/ema.py). Recorded in every generated image's settings.
    ema: bool | None = None

    @property
    def is_sdxl(self) -> bool:
        """SDXL-style UNet: micro-conditioning (pooled text + size/crop ids) through a text_time embedding."""
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD's VAE, 1 in pixel space)."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The side in pixels the base was trained at (UNet sample size x VAE factor)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def text_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, *self.text_modules()) if m is not None]


# ------------------------------------------------------------------------------------------------------------
# latent space: one definition for training (encode) and generation (encode for img2img, decode)
def normalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, C, h, w) -> the UNet's latent space: (z - latents_mean) * scaling_factor / latents_std.

    SD1.x/2.x/SDXL VAEs set only scaling_factor; some (e.g. SD3-style configs) also set per-channel
    latents_mean/latents_std. `vae` None (pixel space): unchanged.
    """
    if vae is None:
        return latents
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) * vae.config.scaling_factor / std


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `normalize_latents`: the UNet's latents (B, C, h, w) -> what `vae.decode` takes."""
    if vae is None:
        return latents
    mean, std = _latent_stats(vae, latents)
    return latents * std / vae.config.scaling_factor + mean


def _latent_stats(vae, latents: torch.Tensor):
    cfg = vae.config
    if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
        shape = (1, -1, 1, 1)  # per channel
        mean = torch.tensor(cfg.latents_mean).view(shape).to(latents.device, latents.dtype)
        return mean, torch.tensor(cfg.latents_std).view(shape).to(latents.device, latents.dtype)
    return 0.0, 1.0


# ------------------------------------------------------------------------------------------------------------
# what the base is, checked before any weights are read
def controlnet_path(spec: str | os.PathLike) -> Path:
    """The file or folder of a ControlNet given as "builtin:NAME", "builtin-dit:NAME" or a path, checked to exist
    (no weights read)."""
    text = str(spec)
    for prefix, base in BUILTIN_CONTROLNET_PREFIXES.items():
        if not text.startswith(prefix):
            continue
        shipped = builtin_controlnets(base)
        name = text[len(prefix) :]
        if name not in shipped:
            known = ", ".join(prefix + n for n in shipped) or "none in this installation"
            raise ValueError(f"unknown built-in ControlNet {text!r}; expected one of: {known}")
        return shipped[name]
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"ControlNet not found: {spec} (expected a file, a diffusers folder, builtin:NAME or builtin-dit:NAME)"
        )
    return path


def base_kind(spec: str | os.PathLike, flag: str = KEYWORDS["base"]) -> tuple[str, Path]:
    """("builtin" | "diffusers" | "exported" | "file", path) of a base spec; the one place that tells them apart.

    "builtin-dit" is the shipped diffusers SD3 folder: ("diffusers", its folder)."""
    if str(spec) == BUILTIN:
        folder = builtin_folder()
        if not (folder / EXPORTED_CONFIG).is_file():
            raise ValueError(f"{flag} builtin: the built-in base model is not shipped in this installation")
        return BUILTIN, folder
    if str(spec) == BUILTIN_DIT:
        folder = builtin_base_folder(BUILTIN_DIT)
        if not (folder / MODEL_INDEX).is_file():
            raise ValueError(
                f"{flag} builtin-dit: the built-in transformer base is not shipped in this installation "
                f"(no {MODEL_INDEX} in {folder})"
            )
        return "diffusers", folder
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"base model not found: {path} (expected 'builtin', 'builtin-dit', a diffusers model folder, a folder "
            "written by `controlnet world export-base`, or one SD checkpoint file: .safetensors/.ckpt)"
        )
    if path.is_file():
        return "file", path
    if (path / MODEL_INDEX).is_file():
        return "diffusers", path
    if (path / EXPORTED_CONFIG).is_file():
        return "exported", path
    raise FileNotFoundError(
        f"{flag} {path}: not a diffusers model folder (no {MODEL_INDEX}) nor one written by `controlnet world "
        f"export-base` (no {EXPORTED_CONFIG})"
    )


def sampling_defaults(spec: str | os.PathLike) -> SamplingDefaults:
    """The base's sampling defaults, read without loading it (diffusers folders and files: the generic ones)."""
    kind, path = base_kind(spec)
    if kind == "file" and transformer_file_arch(path) is not None:
        arch = transformer_file_arch(path)
        return transformer_sampling_of_file(path, arch)
    arch = _folder_arch(kind, path)
    if arch is not None:
        return transformer_sampling(path, arch)
    return SamplingDefaults.read(path if kind in (BUILTIN, "exported") else None)


def _folder_arch(kind: str, path: Path) -> str | None:
    """ "sd3" | "flux" for a diffusers folder of a transformer base, else None."""
    return transformer_arch(json.loads((path / MODEL_INDEX).read_text())) if kind == "diffusers" else None


@dataclass
class BaseSource:
    """A checked base spec: what `check_base` found (no weights read yet)."""

    kind: str
    path: Path
    name: str
    tokenizer: str | None = None  # checked override folders
    tokenizer_2: str | None = None
    components: list[str] = field(default_factory=list)  # what loading will go through, for progress
    arch: str = "unet"  # "unet" | "sd3" | "flux": the base network (io.formats.Family.arch)
    plan: FileBasePlan | None = None  # an SD3 / Flux single file: where each component comes from


def check_base(
    spec: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    tokenizer_2: str | os.PathLike | None = None,
    prediction_type: str | None = None,
    configs: dict | str | os.PathLike | None = None,
    family: str | None = None,
    flags: dict | None = None,
    vae: str | os.PathLike | None = None,
    clip_l: str | os.PathLike | None = None,
    clip_g: str | os.PathLike | None = None,
    t5: str | os.PathLike | None = None,
) -> BaseSource:
    """Check the base spec and its options (files, tokenizers, checkpoint headers), reading no weights.

    Cheap (well under a second plus the tokenizer's own load) so that commands refuse bad arguments before
    spending minutes and gigabytes on a load. `flags` names the options in messages (see KEYWORDS). vae / clip_l /
    clip_g / t5: the parts of an SD3 / Flux single file it does not hold (generate/options.py `BaseParts`).
    """
    flags = {**KEYWORDS, **(flags or {})}
    parts = {"vae": vae, "clip_l": clip_l, "clip_g": clip_g, "t5": t5}
    if prediction_type not in (None, "", "epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={prediction_type!r}: expected epsilon or v_prediction")
    kind, path = base_kind(spec, flags["base"])
    name = str(spec) if str(spec) in BUILTIN_BASES else str(path)  # a shipped base keeps its name
    tokenizer = str(tokenizer) if tokenizer else None
    tokenizer_2 = str(tokenizer_2) if tokenizer_2 else None
    if kind == "file":
        refuse_gguf(path, flags["base"])  # a quantised file, by its first 4 bytes
    arch = transformer_file_arch(path) if kind == "file" else _folder_arch(kind, path)
    if arch is not None and prediction_type:
        raise ValueError(f"prediction_type={prediction_type!r}: {path} is a flow-matching base; it has none")
    if arch is not None and kind == "file":
        plan = check_transformer_file(path, arch, parts, tokenizer, tokenizer_2, configs, flags)
        return BaseSource(kind, path, str(path), tokenizer, tokenizer_2, plan.components, arch, plan)
    given = [name for name, value in parts.items() if value]
    if given:
        raise ValueError(
            f"{flags[given[0]]}: only for an SD3/Flux checkpoint file, which lacks that part; {path} is "
            f"{'a model folder' if kind != 'file' else 'an SD1.x/SD2.x/SDXL checkpoint'}"
        )
    if arch is not None:
        if configs:
            raise ValueError(f"{flags['base_config']}: only for a checkpoint file; {path} is a model folder")
        for folder, key in ((tokenizer, "tokenizer"), (tokenizer_2, "tokenizer_2")):
            if folder is not None:
                load_tokenizer(folder, flags[key])
        components = check_transformer_folder(path, json.loads((path / MODEL_INDEX).read_text()), arch)
        return BaseSource(kind, path, name, tokenizer, tokenizer_2, components, arch)
    if kind == "file":
        from controlnet.io.single_file import check_single_file

        components = check_single_file(path, tokenizer, tokenizer_2, configs, flags, family)
    else:
        if configs:
            raise ValueError(f"{flags['base_config']}: only for a checkpoint file; {path} is a model folder")
        for folder, key in ((tokenizer, "tokenizer"), (tokenizer_2, "tokenizer_2")):
            if folder is not None:
                load_tokenizer(folder, flags[key])
        components = _folder_components(kind, path)
    return BaseSource(kind, path, name, tokenizer, tokenizer_2, components)


def check_controlnet_families(
    source: BaseSource, controlnets, configs: dict | str | os.PathLike | None = None, flags: dict | None = None
) -> None:
    """Refuse a ControlNet made for another base family (an SDXL ControlNet on an SD1.5 base, or the reverse) in one
    line naming both families, from the files' headers and configs alone: milliseconds, before the base is loaded
    (and before an fp16 base is cast to another dtype). `controlnets`: paths or "builtin:NAME" (ControlNet objects
    are skipped: `load_controlnet` checks files). Nothing is refused where a family cannot be told from the files.
    """
    from controlnet.io.formats import check_family
    from controlnet.io.inspect import inspect_path
    from controlnet.io.lite import is_lite_folder

    paths = [controlnet_path(c) for c in controlnets if isinstance(c, (str, os.PathLike))]
    if not paths:
        return
    family = base_family(source, configs, flags)
    if family is None:
        return
    what = f"base {source.name if source.name in BUILTIN_BASES else source.path.name}"
    for path in paths:
        if not is_lite_folder(path):  # ControlNet-lite (the ablation) folders hold their own config
            check_family(inspect_path(path).base_family, family, f"ControlNet {path.name}", what)


def base_family(source: BaseSource, configs=None, flags: dict | None = None):
    """The base UNet's `io.formats.Family` from its files alone (a checkpoint file's header, a folder's
    unet/config.json); None when they do not tell."""
    if source.plan is not None:
        return source.plan.family
    if source.arch != "unet":
        return transformer_family(source.path, source.arch)
    if source.kind == "file":
        from controlnet.io.single_file import base_family as file_family

        return file_family(source.path, configs, {**KEYWORDS, **(flags or {})})
    config = source.path / "unet" / "config.json"
    if not config.is_file():
        return None
    from controlnet.io.formats import family_of_unet_config

    try:
        return family_of_unet_config(json.loads(config.read_text()))
    except (ValueError, AttributeError):
        return None  # an unreadable config is reported by the loader, in its own words


def _folder_index(kind: str, path: Path) -> dict:
    """{component: (library, class)} of a model folder: its model_index.json, or the exported layout's classes."""
    if kind == "diffusers":
        index = json.loads((path / MODEL_INDEX).read_text())
        return {n: tuple(index[n]) for n in COMPONENTS if index.get(n) and None not in tuple(index[n])[:2]} | {
            "_force_zeros": index.get("force_zeros_for_empty_prompt", True)
        }
    return folder_classes(path)


def _folder_components(kind: str, path: Path) -> list[str]:
    index = _folder_index(kind, path)
    missing = [n for n in ("unet", "text_encoder", "tokenizer", "scheduler") if n not in index]
    if missing:
        raise ValueError(f"{path}: the model folder lacks {', '.join(missing)}")
    return [n for n in COMPONENTS if n in index]


# ------------------------------------------------------------------------------------------------------------
# loading
Progress = Callable[[str, int, int], None]  # (component just started, index, total)


def load_base(
    spec: str | os.PathLike | BaseSource,
    tokenizer: str | os.PathLike | None = None,
    tokenizer_2: str | os.PathLike | None = None,
    prediction_type: str | None = None,
    ema: bool | None = None,
    configs: dict | str | os.PathLike | None = None,
    family: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
    flags: dict | None = None,
    **parts,
) -> BaseComponents | TransformerBase:
    """The base named by `spec`, offline, every module in eval mode with no gradients, on `device` in `dtype`.

    A transformer base (SD3 / Flux diffusers folder) gives a `TransformerBase`, each module in its files' dtype
    when `dtype` is None (generate/transformer_base.py).

    tokenizer / tokenizer_2: tokenizer folders (required for a checkpoint file, which holds none; for a folder
    they replace its own). prediction_type: epsilon or v_prediction (default: the base's; for a checkpoint file
    epsilon). ema: a checkpoint file holding EMA weights (`model_ema.*`) loads them when True or None, the
    non-EMA ones when False. configs / family: a checkpoint file of a non-standard architecture (see
    io/single_file.py). `progress(name, k, n)` is called as each component starts loading. parts: vae=, clip_l=,
    clip_g=, t5= for an SD3 / Flux single file (see `check_base`).
    """
    flags = {**KEYWORDS, **(flags or {})}
    source = (
        spec
        if isinstance(spec, BaseSource)
        else check_base(spec, tokenizer, tokenizer_2, prediction_type, configs, family, flags, **parts)
    )
    if ema and not (source.kind == "file" and source.arch == "unet"):
        # only an SD checkpoint file holds two UNets (model_ema.*); elsewhere the choice would be ignored silently
        raise ValueError(
            f"{flags['ema']}: {source.name} holds one set of weights, no EMA UNet (model_ema.*); the choice applies "
            "to an SD checkpoint file holding both (e.g. v1-5-pruned.safetensors)"
        )
    total = len(source.components)

    def step(name: str) -> None:
        logger.info("loading the base's %s from %s", name, source.path)
        if progress is not None:
            progress(name, source.components.index(name) if name in source.components else 0, total)

    if source.plan is not None:
        with quiet_libraries():
            base = load_transformer_file(source.plan, source.name, dtype, device, step)
        if progress is not None:
            progress("done", total, total)
        return base
    if source.arch != "unet":
        with quiet_libraries():
            base = load_transformer_folder(
                source.path, source.arch, source.components, source.name, dtype, device, step
            )
            for key in ("tokenizer", "tokenizer_2"):
                if getattr(source, key) is not None:
                    setattr(base, key, load_tokenizer(getattr(source, key), flags[key]))
        if progress is not None:
            progress("done", total, total)
        return base
    with quiet_libraries():
        if source.kind == "file":
            from controlnet.io.single_file import read_single_file

            # loaded straight in `dtype`: a float file in it stays memory-mapped (no copy; the cast below is a no-op)
            parts = read_single_file(
                source.path,
                source.tokenizer,
                source.tokenizer_2,
                family,
                configs,
                ema,
                on_component=step,
                flags=flags,
                dtype=dtype,
            )
            base = BaseComponents(**parts, name=source.name)
        else:
            base = _load_folder(source, dtype, step)
            for key in ("tokenizer", "tokenizer_2"):
                folder = getattr(source, key)
                if folder is not None:
                    setattr(base, key, load_tokenizer(folder, flags[key]))
    if prediction_type:
        scheduler = base.scheduler
        base.scheduler = type(scheduler).from_config({**scheduler.config, "prediction_type": prediction_type})
    for module in base.modules():
        target = torch.float32 if (module is base.vae and dtype == torch.float16) else dtype
        module.to(device)
        if target is not None and next(module.parameters()).dtype != target:
            module.to(target)
        module.eval().requires_grad_(False)
    if progress is not None:
        progress("done", total, total)
    return base


def _load_folder(source: BaseSource, dtype: torch.dtype | None, step: Callable[[str], None]) -> BaseComponents:
    import importlib

    index = _folder_index(source.kind, source.path)
    # load in the asked dtype (fp16 VAEs decode badly: the VAE stays float32 then); shipped fp16 weights -> float32
    load_dtype = dtype or torch.float32
    parts = {}
    for name in COMPONENTS:
        if name not in index:
            parts[name] = None
            continue
        step(name)
        library, class_name = index[name]
        loader = getattr(importlib.import_module(library), class_name)
        kwargs: dict = {"local_files_only": True}
        if isinstance(loader, type) and issubclass(loader, torch.nn.Module):
            module_dtype = torch.float32 if (name == "vae" and load_dtype == torch.float16) else load_dtype
            kwargs["torch_dtype" if library == "diffusers" else "dtype"] = module_dtype
        try:
            parts[name] = loader.from_pretrained(str(source.path / name), **kwargs)
        except (OSError, ValueError, RuntimeError) as err:  # the libraries' words for corrupt or missing files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{source.path / name}: cannot load the {name} ({first})") from None
    force_zeros = bool(index.get("_force_zeros", True))
    folder = source.path if source.kind in (BUILTIN, "exported") else None
    return BaseComponents(
        **parts, force_zeros_for_empty_prompt=force_zeros, name=source.name, sampling=SamplingDefaults.read(folder)
    )


class _DropEmptyFloat32Advice(logging.Filter):
    """diffusers' `ModelMixin.to(dtype)` warns "modules ... should be kept in float32: []" even when the list is
    empty, i.e. when there is nothing to keep: noise on every cast, dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextlib.contextmanager
def quiet_libraries():
    """While loading: no per-file progress bars of diffusers/transformers (ours report components; the previous
    setting comes back afterwards), and from then on no empty float32 advice."""
    import diffusers
    import transformers

    d_log, t_log = diffusers.utils.logging, transformers.utils.logging
    bars = d_log.is_progress_bar_enabled(), t_log.is_progress_bar_enabled()
    d_log.disable_progress_bar()
    t_log.disable_progress_bar()
    # installed once and kept: the same advice comes from every later cast (e.g. the trainer's to(weight_dtype))
    target = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _DropEmptyFloat32Advice) for f in target.filters):
        target.addFilter(_DropEmptyFloat32Advice())
    try:
        yield
    finally:
        if bars[0]:
            d_log.enable_progress_bar()
        if bars[1]:
            t_log.enable_progress_bar()
