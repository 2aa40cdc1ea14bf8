"""Tiny random SD-style components for pipeline tests (helpers; fixtures are in conftest.py): UNet, VAE, CLIP text encoder(s) and a real CLIP BPE tokenizer.

The tokenizer is a genuine `CLIPTokenizer` built from a small vocab.json + merges.txt written here (no download).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from controlnet.model.controlnet import ControlNet

from tiny import TINY_UNET_CONFIGS, randomize

IMAGE_SIZE = 64  # pixels; latents 8x8 with the 8x VAE below
MAX_TOKENS = 16
WORDS = ("the", "red", "blue", "cat", "dog", "circle", "on", "a")


def write_clip_vocab(folder: Path) -> Path:
    """vocab.json + merges.txt of a tiny byte-level BPE in CLIP's format (letters, word ends, a few merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
    for c in string.ascii_lowercase:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in WORDS:  # merge each word left to right into one token
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            merged = pieces[0] + pieces[1]
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    merges = list(dict.fromkeys(merges))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def make_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_clip_vocab(folder)), model_max_length=MAX_TOKENS)


def make_text_encoder(tokenizer, hidden: int, seed: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def make_vae(seed: int = 3):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        layers_per_block=1,
    ).eval()


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def make_unet(family: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(TINY_UNET_CONFIGS[family], sample_size=IMAGE_SIZE // 8)
    return randomize(UNet2DConditionModel(**config), seed=seed + 100).eval()


def make_controlnet(unet, seed: int) -> ControlNet:
    torch.manual_seed(seed)
    return randomize(ControlNet.from_unet(unet), seed=seed, std=0.05).eval()


def condition_image(seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def to_diffusers_controlnet(net: ControlNet):
    from diffusers import ControlNetModel

    model = ControlNetModel(**net.diffusers_config())
    model.load_state_dict(net.state_dict())
    return model.eval()


def diffusers_sd_pipeline(parts: dict, pipeline_class=None, **components):
    """diffusers' SD pipeline (`pipeline_class`, default StableDiffusionPipeline) over the tiny `parts`."""
    if pipeline_class is None:
        from diffusers import StableDiffusionPipeline as pipeline_class
    pipe = pipeline_class(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_random_builtin_base(folder: Path, words) -> dict:
    """A random base of the built-in architecture saved as `controlnet world export-base` writes it; its parts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from controlnet.builtin import base as builtin_base
    from controlnet.builtin.config import BaseModelConfig
    from controlnet.builtin.text import build_text_encoder, build_tokenizer

    config = BaseModelConfig()
    tokenizer = build_tokenizer(words, config.text.max_length)
    torch.manual_seed(0)
    parts = {
        "unet": UNet2DConditionModel(**builtin_base.unet_kwargs(config)),
        "vae": AutoencoderKL(**builtin_base.vae_kwargs(config)),
        "text_encoder": build_text_encoder(config.text, tokenizer),
        "tokenizer": tokenizer,
    }
    builtin_base.save_builtin_base(parts, config, folder)
    return parts
