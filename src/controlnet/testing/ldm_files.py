"""Random-weight SD1.x single files in the original (LDM) key layout, at any size, without building real modules.

Every tensor is drawn straight into the file's layout from the shapes of meta-device modules (no module memory, no
random initialisation of 860M parameters), so SD1.5-sized files (4.3 GB base + 1.4 GB ControlNet in float32) can be
written on a laptop: the base as `model.diffusion_model.*` + `first_stage_model.*` + `cond_stage_model.transformer.*`,
the ControlNet with `save_controlnet(..., format="original")` (`control_model.*`). Used by the loading tests and by
benchmarks/loading.py (sizes "tiny" and "sd15").
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from controlnet.io import original_keys

# ResNet-internal names, diffusers -> LDM (marked duplication of io/original_keys.py's private table: the test must
# not lean on the code it checks for the decoder half, which original_keys does not cover)
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_OUT = {"conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_to_ldm(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET_TO_LDM.get(head, head)}.{tail}"


def unet_to_ldm(state: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel names -> `model.diffusion_model.*` (the inverse of convert_ldm_unet_checkpoint).

    The encoder, middle block and embeddings follow io/original_keys.py (the ControlNet copies them); the decoder:
    up_blocks.i.resnets.j -> output_blocks.{i (L + 1) + j}.0, attentions.j -> .1, and the upsampler of block i
    -> output_blocks.{i (L + 1) + L}.{1, or 2 behind an attention}.
    """
    stride = config["layers_per_block"] + 1
    with_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_OUT:
            name = f"{_UNET_OUT[module]}.{param}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            name = f"output_blocks.{int(m[1]) * stride + int(m[2])}.0.{_resnet_to_ldm(m[3])}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            name = f"output_blocks.{int(m[1]) * stride + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            block = int(m[1])
            name = f"output_blocks.{block * stride + stride - 1}.{2 if with_attention[block] else 1}.conv.{m[2]}"
        else:
            name = original_keys.to_original(key, config["layers_per_block"], num_hint_blocks=0)
        out["model.diffusion_model." + name] = value
    return out


def vae_to_ldm(state: dict, num_blocks: int) -> dict:
    """diffusers AutoencoderKL names -> `first_stage_model.*` (the inverse of convert_ldm_vae_checkpoint)."""
    out = {}
    for key, value in state.items():
        k = key
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.block.", k
        )
        k = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.",
            k,
        )
        k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            for new, old in (
                ("group_norm", "norm"),
                ("to_q", "q"),
                ("to_k", "k"),
                ("to_v", "v"),
                ("to_out.0", "proj_out"),
            ):
                k = k.replace(f".{new}.", f".{old}.")
            if value.ndim == 2:
                value = value[:, :, None, None]  # linear -> the original's 1x1 conv
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out["first_stage_model." + k] = value
    return out


def random_state(module: torch.nn.Module, seed: int, std: float = 0.02, dtype=torch.float32) -> dict:
    """{name: tensor} of random values for every entry of `module`'s state dict (a meta module: shapes only).

    Norm weights near 1, everything else small normal noise (biases and zero convs included, so every tensor
    matters in parity checks). Integer buffers (CLIP's position_ids) are left out, as original files do.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, meta in module.state_dict().items():
        if not meta.dtype.is_floating_point:
            continue
        value = torch.randn(meta.shape, generator=generator) * std
        if "norm" in name and name.endswith("weight"):
            value += 1.0
        out[name] = value.to(dtype)
    return out


def sd15_parts_config(size: str) -> dict:
    """{"unet", "vae", "text_encoder"} diffusers/transformers configs of an SD1.x base at `size` (tiny | sd15)."""
    from controlnet.io.single_file import family_config
    from controlnet.testing.tiny_models import TINY_UNET_CONFIGS

    family = family_config("sd15")
    if size == "sd15":
        vae = {k: v for k, v in family["vae"].items() if not k.startswith("_")}
        return {"unet": family["unet"], "vae": vae, "text_encoder": dict(family["text_encoders"][0]["config"])}
    if size != "tiny":
        raise ValueError(f"size={size!r}; expected tiny or sd15")
    vae = dict(
        family["vae"], block_out_channels=[8, 16, 16, 16], norm_num_groups=8, layers_per_block=1, sample_size=128
    )
    text = dict(
        family["text_encoders"][0]["config"],
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        vocab_size=1000,
    )
    return {
        "unet": dict(TINY_UNET_CONFIGS["sd15"]),
        "vae": {k: v for k, v in vae.items() if not k.startswith("_")},
        "text_encoder": text,
    }


def meta_parts(configs: dict) -> dict:
    """The UNet, VAE and CLIP text encoder of `configs` on the meta device (no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**configs["unet"]),
            "vae": AutoencoderKL(**configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        }


def write_sd_file(path: Path, configs: dict, seed: int = 0, dtype=torch.float32) -> Path:
    """A random SD1.x single file in the original layout (UNet + VAE + CLIP text encoder) at `path`."""
    from safetensors.torch import save_file

    parts = meta_parts(configs)
    state = unet_to_ldm(random_state(parts["unet"], seed, dtype=dtype), configs["unet"])
    vae = random_state(parts["vae"], seed + 1, dtype=dtype)
    state.update(vae_to_ldm(vae, len(configs["vae"]["block_out_channels"])))
    del vae
    # released files hold transformers-4 names (text_model.*); transformers 5's state dict has no text_model level
    text = random_state(parts["text_encoder"], seed + 2, dtype=dtype)
    state.update({"cond_stage_model.transformer.text_model." + k: v for k, v in text.items()})
    del text
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_controlnet_file(path: Path, unet_config: dict, seed: int = 3, dtype=torch.float32) -> Path:
    """A random ControlNet for that UNet, written as the official files are (`control_model.*`, original layout)."""
    from diffusers import UNet2DConditionModel

    from controlnet.io.api import save_controlnet
    from controlnet.model.controlnet import ControlNet

    with torch.device("meta"):
        net = ControlNet.from_unet(UNet2DConditionModel(**unet_config))
    net.load_state_dict(random_state(net, seed, dtype=dtype), assign=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_controlnet(net, path, format="original")
    return path


def write_unet_file(path: Path, unet_config: dict, seed: int = 0, dtype=torch.float32, ema: bool = False) -> Path:
    """A random UNet alone as an original-layout single file (`model.diffusion_model.*`), as `load_unet`, `init` and
    `transfer` read; `ema`: with EMA twins of every weight (`model_ema.<key without dots>` = the raw weight + 0.5),
    as training checkpoints such as v1-5-pruned hold."""
    from diffusers import UNet2DConditionModel

    from controlnet.io.safe_load import write_state_dict

    with torch.device("meta"):
        meta = UNet2DConditionModel(**unet_config)
    state = unet_to_ldm(random_state(meta, seed, dtype=dtype), unet_config)
    if ema:
        state.update({"model_ema." + "".join(k.split(".")[1:]): v + EMA_TWIN_OFFSET for k, v in state.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_state_dict(state, path)
    return path


EMA_TWIN_OFFSET = 0.5  # write_unet_file's EMA weights: the raw ones + this
