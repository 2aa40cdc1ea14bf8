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
import os
from pathlib import Path

import torch

from controlnet.errors import CheckpointError

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


def detect_family(state: dict, what: str) -> str:
    from controlnet.io.formats import FAMILY_BY_CONTEXT_DIM

    widths = {
        int(v.shape[1]) for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")
    }
    family = next((FAMILY_BY_CONTEXT_DIM[w] for w in widths if w in FAMILY_BY_CONTEXT_DIM), None)
    if family is None:
        raise ValueError(
            f"{what}: cannot tell the base family (cross-attention width {sorted(widths) or 'unknown'}; SD1.x 768, "
            "SD2.x 1024, SDXL 2048); pass family= and configs= for other models"
        )
    return family


def _tokenizer(folder, pad_token: str | None, max_length: int, what: str):
    from transformers import CLIPTokenizer

    if folder is None:
        raise ValueError(
            f"{what}: single checkpoint files hold no tokenizer and nothing is downloaded; pass tokenizer=<folder with "
            "vocab.json + merges.txt or tokenizer.json>, e.g. the tokenizer/ folder of any diffusers SD model"
        )
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    extra = {"pad_token": pad_token} if pad_token else {}
    extra["model_max_length"] = max_length  # prompts are padded to the encoder's positions (77 for CLIP)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)  # every SD family: CLIP BPE


def load_single_file(
    cls,
    path: str | os.PathLike,
    tokenizer=None,
    tokenizer_2=None,
    family: str | None = None,
    configs: dict | None = None,
    prediction_type: str | None = None,
):
    """`cls(...)` (a ControlNetPipeline) from one original checkpoint file.

    tokenizer / tokenizer_2: folders (see the module docstring; tokenizer_2 defaults to tokenizer). family: sd15,
    sd21 or sdxl (default: recognised). configs: per-component overrides {"unet": {...}, "vae": {...},
    "text_encoder": {...}} (for custom or tiny models). prediction_type: epsilon or v_prediction.
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
    from controlnet.io.safe_load import load_strict, read_state_dict

    path = Path(path)
    state = read_state_dict(path)
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise CheckpointError(f"{path}: no UNet weights ({UNET_PREFIX}*); not an SD single-file checkpoint")
    family = family or detect_family(state, path.name)
    config = family_config(family)
    for name, override in (configs or {}).items():
        if name.startswith("text_encoder"):
            for enc in config["text_encoders"]:
                if enc["name"] == name:
                    enc["config"] = dict(override)
        else:
            config[name] = dict(override)

    # UNet and VAE: diffusers' LDM converters, built on the meta device and filled
    unet = build_unet(config["unet"], device="meta").to_empty(device="cpu")
    unet = load_strict(unet, convert_ldm_unet_checkpoint(state, config["unet"]), f"UNet in {path.name}")
    unet = unet.eval().requires_grad_(False)
    vae_config = {k: v for k, v in config["vae"].items() if not k.startswith("_")}
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**vae_config)
    vae = vae.to_empty(device="cpu")
    vae = load_strict(vae, convert_ldm_vae_checkpoint(state, vae_config), f"VAE in {path.name}")
    vae = vae.eval().requires_grad_(False)

    parts = {"unet": unet, "vae": vae}
    for enc in config["text_encoders"]:
        model_cls = getattr(transformers, enc["class"])
        with torch.device("meta"):
            model = model_cls(transformers.CLIPTextConfig(**enc["config"]))
        model = model.to_empty(device="cpu")
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
        for name, buffer in model.named_buffers():  # position_ids is a buffer, not a weight: rebuild it
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
        model = load_strict(model, weights, f"{enc['name']} in {path.name}", optional=("position_ids",))
        parts[enc["name"]] = model.eval().requires_grad_(False)
        folder = tokenizer if enc["name"] == "text_encoder" else (tokenizer_2 or tokenizer)
        parts[enc["name"].replace("text_encoder", "tokenizer")] = _tokenizer(
            folder, enc["pad_token"], enc["config"]["max_position_embeddings"], path.name
        )

    sched_config = dict(config["scheduler"])
    if prediction_type is not None:
        sched_config["prediction_type"] = prediction_type
    parts["scheduler"] = getattr(diffusers, sched_config.pop("_class_name")).from_config(sched_config)
    pipe = cls(**parts)
    pipe.base_name = str(path)
    return pipe
