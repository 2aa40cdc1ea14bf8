"""A tiny random pixel-space base model (UNet + CLIP text encoder + word tokenizer + DDIM) for training tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from controlnet.generate.base import BaseComponents
from controlnet.world.fill import FILL_VOCABULARY

TINY_SIZE = 16  # px: the smallest fill-task image
TINY_UNET = dict(
    sample_size=TINY_SIZE,
    in_channels=3,
    out_channels=3,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[16, 32],
    layers_per_block=1,
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=8,
)


def make_tiny_base(seed: int = 0, latent: bool = False) -> BaseComponents:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from controlnet.builtin.text import build_tokenizer

    tokenizer = build_tokenizer(FILL_VOCABULARY, max_length=8)
    torch.manual_seed(seed)
    unet_cfg = dict(TINY_UNET)
    vae = None
    if latent:
        unet_cfg.update(in_channels=4, out_channels=4, sample_size=TINY_SIZE // 2)
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(
            block_out_channels=[8, 16],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
        )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    for m in (unet, text_encoder, vae):
        if m is not None:
            m.eval().requires_grad_(False)
    return BaseComponents(unet, vae, text_encoder, tokenizer, scheduler)


def save_tiny_base(folder: Path, seed: int = 0) -> Path:
    """Write the tiny base as a diffusers model folder (model_index.json + component folders)."""
    base = make_tiny_base(seed)
    folder = Path(folder)
    base.unet.save_pretrained(folder / "unet")
    base.text_encoder.save_pretrained(folder / "text_encoder")
    base.tokenizer.save_pretrained(folder / "tokenizer")
    base.scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "vae": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def make_fill_dataset(folder: Path, n: int = 24, size: int = TINY_SIZE, seed: int = 0) -> Path:
    from controlnet.world.dataset import write_dataset

    return write_dataset("fill", n, size, folder, seed=seed, workers=1)


def make_tiny_sdxl_base(seed: int = 0) -> BaseComponents:
    """A tiny pixel-space SDXL-style base: text_time micro-conditioning, two text encoders (the second pooled)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from controlnet.builtin.text import build_tokenizer

    tokenizers = [build_tokenizer(FILL_VOCABULARY, max_length=8) for _ in range(2)]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_SIZE,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[16, 32],
        cross_attention_dim=32,
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 16,
    )
    encoders = []
    for k, cls in enumerate((CLIPTextModel, CLIPTextModelWithProjection)):
        torch.manual_seed(seed + 1 + k)
        config = CLIPTextConfig(
            vocab_size=len(tokenizers[k]),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=8,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            projection_dim=16,
        )
        encoders.append(cls(config).eval().requires_grad_(False))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    unet.eval().requires_grad_(False)
    return BaseComponents(unet, None, encoders[0], tokenizers[0], scheduler, encoders[1], tokenizers[1])
