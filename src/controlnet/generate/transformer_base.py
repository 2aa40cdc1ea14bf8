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

The single files users have (Stability's SD3 / SD3.5 checkpoints, with or without their VAE and text encoders inside;
BFL's Flux transformer files with `ae.safetensors` and text encoder folders) are checked by `check_transformer_file`
from the headers and the parts' options (`vae`, `clip_l`, `clip_g`, `t5`: generate/options.py `BaseParts`), before
any weight is read, and loaded by `load_transformer_file`, every module in its file's dtype unless one is asked for
(io/transformer_files.py renames and builds them).
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
    # a base trained without T5 says how many zero tokens it was trained with (builtin-dit: 0); no note then
    trained_without = SamplingDefaults.read(path).max_sequence_length is not None
    if arch == "sd3" and "text_encoder_3" not in present and not trained_without:
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


def transformer_sampling(path: Path, arch: str) -> SamplingDefaults:
    """The folder's sampling.json (SamplingDefaults.read: e.g. builtin-dit's guidance 4, 20 steps, 0 zero tokens)
    over the family's defaults; a Flux base without a guidance embedding (schnell) has its own."""
    family = SAMPLING[arch]
    if arch == "flux":
        try:
            config = json.loads((path / "transformer" / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        if not config.get("guidance_embeds"):
            family = SAMPLING["flux-schnell"]
    return SamplingDefaults.read(path, family)


def transformer_sampling_of_file(path: Path, arch: str) -> SamplingDefaults:
    """As `transformer_sampling`, for a single file: a Flux file without `guidance_in` (schnell) has its own."""
    if arch == "flux" and not any("guidance_in." in key for key in _header(path) or {}):
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
    return TransformerBase(arch=arch, name=name, sampling=transformer_sampling(path, arch), **parts)


def _entry(index: dict, component: str) -> tuple[str, str] | None:
    value = index.get(component)
    if not isinstance(value, list) or len(value) != 2 or None in value:
        return None
    return value[0], value[1]


# ------------------------------------------------------------------------------------------------------------
# single files: SD3 / SD3.5 checkpoints, Flux transformer files (+ ae.safetensors and text encoder folders)
PART_OPTIONS = ("vae", "clip_l", "clip_g", "t5")  # generate/options.py BaseParts: the loader's keywords
CONFIG_KEYS = ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3")
T5_NOTE = (
    "%s: no T5 text encoder (pass %s DIR for it): SD3 runs on its CLIP encoders alone, with zeros in T5's place; "
    "long or detailed prompts follow less well"
)


@dataclass
class FilePart:
    """Where one component of a file base comes from: tensors under `prefix` in a file, or a folder."""

    path: Path
    source: str  # "file" | "folder"
    prefix: str = ""
    config: dict = field(default_factory=dict)  # the module's config (file parts)
    dtype: torch.dtype | None = None  # its weights' dtype
    class_name: str = ""


@dataclass
class FileBasePlan:
    """A checked SD3 / Flux base file: every component's source, config and dtype, and the tokenizers (no weights
    read). `components` are the loading steps, for progress."""

    arch: str
    path: Path
    parts: dict[str, FilePart]
    tokenizers: dict[str, object]
    scheduler: dict
    guidance: bool = True  # Flux: a guidance embedding (dev); without one, schnell's defaults

    @property
    def components(self) -> list[str]:
        return ["checkpoint", *self.parts, "scheduler"]

    @property
    def family(self):
        from controlnet.io.formats import Family

        return Family(self.parts["transformer"].config.get("joint_attention_dim"), arch=self.arch)


def check_transformer_file(
    path: Path, arch: str, options: dict, tokenizer, tokenizer_2, configs, flags: dict
) -> FileBasePlan:
    """Check an SD3 / Flux base file and its parts' options from headers and configs alone; see the module docstring.

    options: {"vae", "clip_l", "clip_g", "t5"} -> a path or None. Each missing part is refused in one line naming
    its option (SD3's T5 is optional: a logged note); configs that the shapes cannot give are refused asking for
    `configs` (--base-config), whose entries replace the derived values per component.
    """
    from controlnet.io import transformer_files as tf
    from controlnet.io.safe_load import check_strict
    from controlnet.io.single_file import read_configs

    overrides = read_configs(configs, flags["base_config"])
    unknown = sorted(set(overrides) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"{flags['base_config']}: {unknown[0]!r} is not a component of {ARCH_NAMES[arch]}; expected "
            f"{', '.join(CONFIG_KEYS)}"
        )
    constants = tf.family_constants(arch)
    meta = tf.read_header(path, flags["base"])
    prefix, tensors = tf.transformer_part(meta, arch)
    ours = tf.to_ours(tensors, arch, path.name)
    try:
        derived = tf.transformer_config(ours, arch, path.name, flags["base_config"])
    except KeyError as err:
        raise CheckpointError(
            f"{path.name}: no {err} in {ARCH_NAMES[arch]}'s weights; not a complete checkpoint"
        ) from None
    config = {**derived, **constants["transformer"]}
    config.update(overrides.get("transformer", {}))
    if arch == "flux" and "axes_dims_rope" not in overrides.get("transformer", {}):
        head = config["attention_head_dim"]
        if sum(config["axes_dims_rope"]) != head:
            raise tf._needs_config(
                path.name,
                f"rotary axes for {head}-wide heads are in no weight; Flux's are 128",
                flags["base_config"],
            )
    _check_shapes(ours, arch, config, f"the transformer in {path.name}", check_strict)
    parts = {"transformer": FilePart(path, "file", prefix, config, tf.weights_dtype(tensors.values()))}
    parts["vae"] = _vae_part(path, meta, options.get("vae"), constants, overrides, flags)
    tokenizers: dict = {}
    for slot, (option, class_name) in tf.ENCODERS[arch].items():
        clip = (tokenizer, tokenizer_2)
        found = _encoder_part(
            path, meta, arch, slot, option, class_name, options, clip, constants, overrides, flags
        )
        if found is None:
            continue
        parts[slot], tokenizers[slot.replace("text_encoder", "tokenizer")] = found
    guidance = arch != "flux" or bool(config.get("guidance_embeds"))
    scheduler = dict(constants["scheduler" if guidance else "scheduler_schnell"])
    scheduler.update(overrides.get("scheduler", {}))
    return FileBasePlan(arch, path, parts, tokenizers, scheduler, guidance)


def _check_shapes(ours: dict, arch: str, config: dict, what: str, check_strict) -> None:
    """The derived config against the file's names and shapes (the model built on the meta device: no memory)."""
    import diffusers

    cls = diffusers.SD3Transformer2DModel if arch == "sd3" else diffusers.FluxTransformer2DModel
    try:
        with torch.device("meta"):
            model = cls(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{what}: its config does not build ({err})") from None
    check_strict(model.state_dict(), ours, what)


def _vae_part(path: Path, meta: dict, option, constants: dict, overrides: dict, flags: dict) -> FilePart:
    from controlnet.io import transformer_files as tf

    if option is None:
        if not any(k.startswith(tf.VAE_PREFIX) for k in meta):
            raise ValueError(
                f"{flags['base']} {path.name}: the file holds no VAE; pass {flags['vae']} PATH (Flux's ae.safetensors, "
                "or a diffusers vae/ folder)"
            )
        vae_path, vae_meta, prefix = path, tf.part(meta, tf.VAE_PREFIX), tf.VAE_PREFIX
    else:
        vae_path = Path(option)
        if vae_path.is_dir():
            if not (vae_path / "config.json").is_file():
                raise FileNotFoundError(
                    f"{flags['vae']} {vae_path}: no config.json; expected a diffusers vae/ folder"
                )
            return FilePart(vae_path, "folder", dtype=files_dtype(vae_path), class_name="AutoencoderKL")
        if not vae_path.is_file():
            raise FileNotFoundError(f"{flags['vae']} {vae_path}: not found (expected a VAE file or folder)")
        vae_meta = tf.read_header(vae_path, flags["vae"])
        prefix = tf.VAE_PREFIX if any(k.startswith(tf.VAE_PREFIX) for k in vae_meta) else ""
        vae_meta = tf.part(vae_meta, prefix)
        if "decoder.conv_in.weight" not in vae_meta:
            raise CheckpointError(
                f"{flags['vae']} {vae_path.name}: no VAE decoder (decoder.conv_in); not a VAE file"
            )
    try:
        config = {**tf.vae_config(vae_meta), **constants["vae"], **overrides.get("vae", {})}
    except KeyError as err:
        raise CheckpointError(f"the VAE in {vae_path.name} lacks {err}; not an LDM/BFL VAE") from None
    return FilePart(vae_path, "file", prefix, config, tf.weights_dtype(vae_meta.values()), "AutoencoderKL")


def _encoder_part(path, meta, arch, slot, option, class_name, options, clip, constants, overrides, flags):
    """(FilePart, tokenizer) of one text encoder, or None for SD3's T5 when none is given (a logged note)."""
    from controlnet.io import transformer_files as tf

    flag = flags[option]
    folder = Path(options[option]) if options.get(option) else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder}: folder not found (expected a text encoder or tokenizer folder)")
    prefix = tf.SD3_ENCODER_PREFIXES[slot] if arch == "sd3" else None
    in_file = prefix is not None and any(k.startswith(prefix) for k in meta)
    t5 = class_name.startswith("T5")
    what = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5"}[option]
    if folder is not None and (folder / "config.json").is_file():
        part = FilePart(folder, "folder", dtype=files_dtype(folder), class_name=class_name)
    elif in_file:
        part = FilePart(path, "file", prefix, class_name=class_name)
    elif folder is not None:
        raise ValueError(
            f"{flag} {folder}: holds no text encoder (config.json + weights), and {path.name} no {what}"
        )
    elif t5 and arch == "sd3":
        logger.warning(T5_NOTE, path.name, flag)
        return None
    else:
        holds = "Flux transformer files hold no text encoder" if arch == "flux" else f"{path.name} holds no {what}"
        raise ValueError(
            f"{flags['base']} {path.name}: {holds}; pass {flag} DIR (the {what} text encoder folder, e.g. {slot}/ of a "
            "diffusers model, with its tokenizer)"
        )
    tokenizer = _encoder_tokenizer(path, arch, slot, option, folder, clip, flags)
    if part.source == "file":
        encoder_meta = tf.part(meta, prefix)
        try:
            if t5:
                config = tf.t5_config(encoder_meta, constants.get(slot, {}))
            else:
                config = tf.clip_config(encoder_meta, constants.get(slot, {}))
                ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
                config.update({k: v for k, v in ids.items() if v is not None})
        except KeyError as err:
            raise CheckpointError(f"the {what} in {path.name} lacks {err}") from None
        part.config = {**config, **overrides.get(slot, {})}
        part.dtype = tf.weights_dtype(encoder_meta.values())
    return part, tokenizer


def _encoder_tokenizer(path, arch, slot, option, folder, clip, flags):
    """The encoder's tokenizer: in its option's folder, or the sibling tokenizer folder of a diffusers layout
    (text_encoder_2/ -> tokenizer_2/), or for CLIP --tokenizer / --tokenizer-2 (CLIP-G pads with "!" as SD3 does)."""
    from controlnet.io import transformer_files as tf
    from controlnet.io.tokenizers import tokenizer_files

    tokenizer_slot = slot.replace("text_encoder", "tokenizer")
    candidates = [folder] if folder is not None else []
    if folder is not None and folder.name.startswith("text_encoder"):
        candidates.append(folder.parent / folder.name.replace("text_encoder", "tokenizer"))
    for candidate in candidates:
        if candidate.is_dir() and (tokenizer_files(candidate) or (candidate / "spiece.model").is_file()):
            return _tokenizer_from_folder(candidate, flags[option])
    tokenizer, tokenizer_2 = clip
    if option == "clip_g" and tokenizer_2 is not None:
        return _tokenizer_from_folder(Path(tokenizer_2), flags["tokenizer_2"])
    if option in ("clip_l", "clip_g") and tokenizer is not None:
        extra = tf.family_constants(arch).get(tokenizer_slot, {}) if option == "clip_g" else {}
        return _tokenizer_from_folder(Path(tokenizer), flags["tokenizer"], **extra)
    where = f"{folder} has none" if folder is not None else f"{path.name} holds none"
    also = f" or {flags['tokenizer']} DIR" if option != "t5" else ""
    raise ValueError(
        f"{flags[option]}: the {option} tokenizer is missing ({where}); pass {flags[option]} DIR{also}"
    )


def _tokenizer_from_folder(folder: Path, flag: str, **extra):
    """A tokenizer of the class its tokenizer_config.json names (as a diffusers folder's index would), else
    io/tokenizers.py's CLIP BPE / tokenizer.json reader; refused unless it encodes a plain sentence."""
    import transformers

    from controlnet.io.tokenizers import check_tokenizer, load_tokenizer

    config = folder / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        return load_tokenizer(folder, flag, **extra)
    try:
        tokenizer = cls.from_pretrained(str(folder), local_files_only=True, **extra)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{flag} {folder}: cannot load its tokenizer ({str(err).splitlines()[0]})") from None
    return check_tokenizer(tokenizer, f"{flag} {folder}")


def load_transformer_file(
    plan: FileBasePlan, name: str, dtype: torch.dtype | None, device, step: Callable[[str], None]
) -> TransformerBase:
    """The components of a checked file base, each in its weights' dtype unless `dtype` is given (a bf16 file is
    loaded without a float32 copy: same-dtype tensors stay memory-mapped), in eval mode with no gradients."""
    import diffusers
    import transformers

    from controlnet.io import transformer_files as tf
    from controlnet.io.safe_load import map_state_dict

    step("checkpoint")
    states = {plan.path: map_state_dict(plan.path)}  # memory-mapped: file-backed pages, no copy
    modules: dict = {}
    for component, part in plan.parts.items():
        step(component)
        target = dtype or part.dtype or torch.float32
        what = f"the {component} in {part.path.name}"
        if part.source == "folder":
            library = diffusers if component == "vae" else transformers
            kwargs = {"torch_dtype" if component == "vae" else "dtype": target}
            try:
                modules[component] = getattr(library, part.class_name).from_pretrained(
                    str(part.path), local_files_only=True, **kwargs
                )
            except (OSError, ValueError, RuntimeError, TypeError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise CheckpointError(f"{part.path}: cannot load the {component} ({first})") from None
            continue
        if part.path not in states:
            states[part.path] = map_state_dict(part.path)
        state = states[part.path]
        if component == "transformer":
            tensors = tf.transformer_part(state, plan.arch)[1]
            modules[component] = tf.load_transformer(tensors, plan.arch, part.config, target, what)
        elif component == "vae":
            modules[component] = tf.load_vae(tf.part(state, part.prefix), part.config, target, what)
        else:
            tensors = tf.part(state, part.prefix)
            modules[component] = tf.load_text_encoder(tensors, part.class_name, part.config, target, what)
        for key in [k for k in state if k.startswith(part.prefix)] if part.prefix else []:
            del state[key]  # cast originals are given back as loading goes
    del states
    for module in modules.values():
        module.to(device).eval().requires_grad_(False)
    config = {k: v for k, v in plan.scheduler.items() if k != "_class_name"}
    scheduler = getattr(diffusers, plan.scheduler["_class_name"]).from_config(config)
    sampling = SAMPLING[plan.arch] if plan.guidance else SAMPLING["flux-schnell"]
    return TransformerBase(
        arch=plan.arch, name=name, sampling=sampling, scheduler=scheduler, **modules, **plan.tokenizers
    )
