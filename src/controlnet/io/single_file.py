"""Load a whole SD1.x / SD2.x / SDXL model from one original checkpoint file, offline.

A single `.safetensors` / `.ckpt` (what most users download) holds the UNet (`model.diffusion_model.*`), the VAE
(`first_stage_model.*`) and the text encoder(s) (`cond_stage_model.*` or SDXL's `conditioner.embedders.*`) but no
configs and no tokenizer. The architecture configs ship with this package (`io/configs/<family>_pipeline.json`, the
UNet's in `io/configs/`); the family is recognised from the cross-attention width (768 / 1024 / 2048). Weights are
renamed by diffusers' converters and loaded strictly. The tokenizer (CLIP's BPE vocab.json + merges.txt) is not in
the file and is not downloaded: pass the `tokenizer/` folder of any diffusers SD model (all SD families share the
CLIP BPE vocabulary; SD2.x and SDXL's second encoder pad with "!").
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from controlnet.errors import CheckpointError
from controlnet.io.ema import select_unet_weights
from controlnet.io.safe_load import load_into_empty

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
FAMILIES = ("sd15", "sd21", "sdxl")
UNET_PREFIX = "model.diffusion_model."


def family_config(family: str) -> dict:
    """The shipped component configs of `family` (sd15, sd21, sdxl), UNet included."""
    from controlnet.io.formats import builtin_unet_config

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; expected one of {', '.join(FAMILIES)}")
    config = json.loads((CONFIG_DIR / f"{family}_pipeline.json").read_text())
    config["unet"] = {k: v for k, v in builtin_unet_config(family).items() if not k.startswith("_")}
    return config


def detect_family(state: dict, what: str, flag: str = "configs") -> str:
    """sd15 / sd21 / sdxl from the UNet's cross-attention width (`state` may hold meta tensors: shapes only)."""
    from controlnet.io.formats import FAMILY_BY_CONTEXT_DIM

    widths = {
        int(v.shape[1]) for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")
    }
    family = next((FAMILY_BY_CONTEXT_DIM[w] for w in widths if w in FAMILY_BY_CONTEXT_DIM), None)
    if family is None:
        raise ValueError(
            f"{what}: cannot tell the base family (cross-attention width {sorted(widths) or 'unknown'}; SD1.x 768, "
            f'SD2.x 1024, SDXL 2048); for other models pass {flag} FILE (a JSON file with "family" and the '
            'diffusers configs of "unet", "vae", "text_encoder")'
        )
    return family


def read_configs(configs: dict | str | os.PathLike | None, flag: str = "configs") -> dict:
    """Per-component config overrides: a dict, or a JSON file of one ({"family": ..., "unet": {...}, ...})."""
    if configs is None or isinstance(configs, dict):
        return dict(configs or {})
    path = Path(configs)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: config file not found")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} {path}: not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{flag} {path}: expected a JSON object of component configs")
    return values


def _header(path: Path) -> dict | None:
    """{key: meta tensor of its shape} of a .safetensors file (its header) or a zip-format .ckpt (its pickle,
    memory-mapped: no tensor data read); None for other formats, whose tensors would have to be read."""
    from controlnet.io.safe_load import PICKLE_SUFFIXES, ZIP_MAGIC, LazyWeights

    suffix = path.suffix.lower()
    try:
        if suffix in PICKLE_SUFFIXES:
            with path.open("rb") as handle:
                if not handle.read(4).startswith(ZIP_MAGIC):
                    return None
        elif suffix != ".safetensors":
            return None
        with LazyWeights(path) as weights:
            return weights.meta
    except Exception as err:  # noqa: BLE001 - any unreadable header: read_state_dict reports it in its own words
        logger.debug("%s: header not readable (%s)", path, err)
        return None


def base_family(path: Path, configs=None, flags: dict | None = None):
    """The `formats.Family` of a checkpoint file's UNet, from its header (or, for a file whose header cannot be read
    without its tensors, the --base-config overrides / family); None when neither tells."""
    from controlnet.io.formats import family_of_state, family_of_unet_config

    header = _header(path)
    if header is not None and any(k.startswith(UNET_PREFIX) for k in header):
        return family_of_state({k: v for k, v in header.items() if k.startswith(UNET_PREFIX)})
    overrides = read_configs(configs, (flags or {}).get("base_config", "configs"))
    if "unet" in overrides:
        return family_of_unet_config(overrides["unet"])
    if overrides.get("family"):
        return family_of_unet_config(family_config(overrides["family"])["unet"])
    return None


def _family(state: dict, path: Path, family: str | None, overrides: dict, flags: dict) -> str:
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise CheckpointError(f"{path}: no UNet weights ({UNET_PREFIX}*); not an SD single-file checkpoint")
    return (
        family or overrides.get("family") or detect_family(state, path.name, flags.get("base_config", "configs"))
    )


def check_single_file(
    path: Path, tokenizer, tokenizer_2, configs, flags: dict, family: str | None = None
) -> list[str]:
    """Check a checkpoint file and its options before reading its weights; returns the components to load.

    A .safetensors header tells the family and whether it holds a UNet; the tokenizer folder(s) are loaded and
    checked (io/tokenizers.py).
    """
    from controlnet.io.tokenizers import load_tokenizer

    overrides = read_configs(configs, flags.get("base_config", "configs"))
    header = _header(path)
    if header is not None:
        family = _family(header, path, family, overrides, flags)
    family = family or overrides.get("family")
    if tokenizer is None:
        raise ValueError(
            f"{path.name}: checkpoint files hold no tokenizer and nothing is downloaded; pass "
            f"{flags.get('tokenizer', 'tokenizer')} DIR (a folder with vocab.json + merges.txt or tokenizer.json, "
            "e.g. the tokenizer/ folder of any diffusers SD model)"
        )
    load_tokenizer(tokenizer, flags.get("tokenizer", "tokenizer"))
    encoders = ["text_encoder"]
    if family == "sdxl":
        encoders.append("text_encoder_2")
        if tokenizer_2 is not None:
            load_tokenizer(tokenizer_2, flags.get("tokenizer_2", "tokenizer_2"))
    return ["checkpoint", "unet", "vae", *encoders, "scheduler"]


def _tokenizer(folder, pad_token: str | None, max_length: int):
    from transformers import CLIPTokenizer

    extra = {"pad_token": pad_token} if pad_token else {}
    extra["model_max_length"] = max_length  # prompts are padded to the encoder's positions (77 for CLIP)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)  # every SD family: CLIP BPE


def _drop(state: dict, prefix: str) -> None:
    """Forget the loaded part's entries, so that tensors the part did not keep (cast originals) are freed."""
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]


def read_single_file(
    path: str | os.PathLike,
    tokenizer=None,
    tokenizer_2=None,
    family: str | None = None,
    configs: dict | str | os.PathLike | None = None,
    ema: bool | None = None,
    on_component=None,
    flags: dict | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """The components of one original checkpoint file: {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    (+ "text_encoder_2", "tokenizer_2" for SDXL), on the CPU in `dtype` (default float32; the VAE stays float32 for
    float16), in eval mode with no gradients, ready for `BaseComponents(**parts)`.

    tokenizer / tokenizer_2: folders (see the module docstring; tokenizer_2 defaults to tokenizer). family: sd15,
    sd21 or sdxl (default: recognised, or configs' "family"). configs: per-component overrides {"unet": {...},
    "vae": {...}, "text_encoder": {...}} or a JSON file of them (custom or tiny models). ema: see
    `io.ema.select_unet_weights` (default: the EMA weights when the file has them); "ema" in the result says which
    were loaded (None: the file holds one UNet). `on_component(name)` is called as each part starts. The scheduler's prediction type is
    the family's (set another on the loaded bundle). Tensors already in `dtype` are not copied: from a
    `.safetensors` or zip `.ckpt` they stay memory-mapped (file-backed pages, not anonymous memory).
    """
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    from controlnet.io.api import build_unet
    from controlnet.io.safe_load import map_state_dict

    flags = flags or {}
    step = on_component or (lambda name: None)
    path = Path(path)
    overrides = read_configs(configs, flags.get("base_config", "configs"))
    if tokenizer is None:
        check_single_file(path, tokenizer, tokenizer_2, configs, flags, family)  # the missing-tokenizer message
    step("checkpoint")
    state = map_state_dict(path)  # memory-mapped: tensors stay file-backed until a cast needs a copy
    family = _family(state, path, family, overrides, flags)
    config = family_config(family)
    for name, override in overrides.items():
        if name == "family":
            continue
        if name.startswith("text_encoder"):
            for enc in config["text_encoders"]:
                if enc["name"] == name:
                    enc["config"] = dict(override)
        else:
            config[name] = dict(override)
    state, used_ema = select_unet_weights(state, ema, path.name, flags)
    dtype = dtype or torch.float32

    # Each part is built on the meta device and takes the file's tensors themselves (diffusers' converters only
    # rename, and slice the VAE's 1x1 attention convs into views; OpenCLIP's fused q/k/v are split into copies), so
    # a memory-mapped float file in `dtype` costs its page cache and no second copy. A part's keys are dropped
    # from `state` once it is loaded, so that cast originals are given back as loading goes.
    step("unet")
    unet = load_into_empty(
        build_unet(config["unet"], device="meta"),
        convert_ldm_unet_checkpoint(state, config["unet"]),
        f"UNet in {path.name}",
        dtype,
    )
    _drop(state, UNET_PREFIX)
    step("vae")
    vae_config = {k: v for k, v in config["vae"].items() if not k.startswith("_")}
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**vae_config)
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype  # fp16 VAEs decode badly (as generate/base.py)
    vae = load_into_empty(vae, convert_ldm_vae_checkpoint(state, vae_config), f"VAE in {path.name}", vae_dtype)
    _drop(state, "first_stage_model.")

    parts = {"unet": unet, "vae": vae, "ema": used_ema}
    for enc in config["text_encoders"]:
        step(enc["name"])
        model_cls = getattr(transformers, enc["class"])
        with torch.device("meta"):
            model = model_cls(transformers.CLIPTextConfig(**enc["config"]))
        if enc["kind"] == "clip":
            weights = convert_ldm_clip_checkpoint(state, remove_prefix=enc["prefix"])
        else:
            weights = convert_open_clip_checkpoint(model, state, prefix=enc["prefix"])
        own = model.state_dict()
        # files use transformers 4 names (text_model.*); transformers 5's CLIPTextModel has no text_model level
        weights = {
            (k if k in own or not k.startswith("text_model.") else k[len("text_model.") :]): v
            for k, v in weights.items()
            if not k.endswith("position_ids")
        }
        if not weights:
            raise CheckpointError(f"{path}: no {enc['name']} weights under {enc['prefix']}")
        model = load_into_empty(model, weights, f"{enc['name']} in {path.name}", dtype, optional=("position_ids",))
        del weights
        _drop(state, enc["prefix"])
        parts[enc["name"]] = model
        folder = tokenizer if enc["name"] == "text_encoder" else (tokenizer_2 or tokenizer)
        parts[enc["name"].replace("text_encoder", "tokenizer")] = _tokenizer(
            folder, enc["pad_token"], enc["config"]["max_position_embeddings"]
        )

    step("scheduler")
    sched_config = dict(config["scheduler"])
    parts["scheduler"] = getattr(diffusers, sched_config.pop("_class_name")).from_config(sched_config)
    return parts
