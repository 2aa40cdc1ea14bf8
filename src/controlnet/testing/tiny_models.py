"""Tiny random models for tests and benchmarks: stand-ins with each Stable Diffusion family's structural features.

SD1.x (conv 1x1 attention projections, attention_head_dim = number of heads), SD2.x (linear projections, heads per
level, another context width) and SDXL (text_time added embedding, 3 levels, deeper transformers) UNets; an 8x VAE,
CLIP text encoders and a genuine `CLIPTokenizer` built from a small vocab.json + merges.txt written on the spot (no
download); a DDIM scheduler; ControlNets copied from a UNet. Every builder seeds torch itself, so a component is the
same in every test and benchmark that builds it. Nothing is built at import.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

IMAGE_SIZE = 64  # pixels of the pipeline-sized stand-ins: latents 8x8 with the 8x VAE below
MAX_TOKENS = 16  # the tiny tokenizer's and text encoders' context length
WORDS = ("the", "red", "blue", "cat", "dog", "circle", "on", "a")  # each merged into one token by the tiny BPE

_COMMON = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=16)
_SD15 = dict(
    _COMMON,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64],
    cross_attention_dim=32,
    attention_head_dim=2,
)
TINY_UNET_CONFIGS = {
    # SD1.x: conv 1x1 proj_in/out, attention_head_dim = number of heads
    "sd15": _SD15,
    # SD2.x: linear projections, per-level heads, another context width
    "sd21": dict(_SD15, cross_attention_dim=24, attention_head_dim=[2, 4], use_linear_projection=True),
    # SDXL: text_time added embedding, 3 levels (10 control outputs), deeper transformers
    "sdxl": dict(
        _COMMON,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[16, 32, 64],
        cross_attention_dim=32,
        attention_head_dim=[2, 4, 4],
        transformer_layers_per_block=[1, 1, 2],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,  # 6 time ids of 8 channels + the pooled text (32)
    ),
}


# ------------------------------------------------------------------------------------------------------------
# UNets and ControlNets
def make_tiny_unet(family: str, seed: int = 0):
    """The tiny UNet of `family` (a key of TINY_UNET_CONFIGS) at 16x16 latents, diffusers' initialisation."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET_CONFIGS[family])


def randomize(module: torch.nn.Module, seed: int = 1, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter (zero convs included) random values, so parity checks see every weight."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=generator) * std + offset)
    return module


def make_unet(family: str, seed: int = 0):
    """The tiny UNet of `family` sized for IMAGE_SIZE images (8x8 latents), every weight random, in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(TINY_UNET_CONFIGS[family], sample_size=IMAGE_SIZE // 8)
    return randomize(UNet2DConditionModel(**config), seed=seed + 100).eval()


def make_controlnet(unet, seed: int):
    """A ControlNet copied from `unet` (paper Sec. 3.2), every weight random (zero convs too), in eval mode."""
    from controlnet.model.controlnet import ControlNet

    torch.manual_seed(seed)
    return randomize(ControlNet.from_unet(unet), seed=seed, std=0.05).eval()


def tiny_inputs(family: str, batch: int = 2, seed: int = 2, downscale: int = 8) -> dict:
    """Random UNet inputs for `make_tiny_unet(family)`: sample, timestep, context, a condition image `downscale`
    times the latent size, and SDXL's added conditions."""
    cfg = TINY_UNET_CONFIGS[family]
    generator = torch.Generator().manual_seed(seed)
    size = cfg["sample_size"]
    inputs = {
        "sample": torch.randn(batch, cfg["in_channels"], size, size, generator=generator),  # (B, 4, h, w)
        "timestep": torch.tensor([10, 700][:batch] + [500] * max(0, batch - 2)),  # (B,)
        "encoder_hidden_states": torch.randn(
            batch, 7, cfg["cross_attention_dim"], generator=generator
        ),  # (B, 7, D)
        "cond": torch.rand(batch, 3, size * downscale, size * downscale, generator=generator),  # (B, 3, H, W)
    }
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=generator),
            "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * batch),
        }
    return inputs


def controlled_unet_output(unet, inputs: dict, out=None) -> torch.Tensor:
    """The UNet's epsilon for `tiny_inputs`, with a ControlNet's residuals added when `out` is given."""
    extra = {"added_cond_kwargs": inputs["added_cond_kwargs"]} if "added_cond_kwargs" in inputs else {}
    if out is not None:
        extra["down_block_additional_residuals"] = tuple(out.down)
        extra["mid_block_additional_residual"] = out.mid
    return unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], **extra).sample


# ------------------------------------------------------------------------------------------------------------
# VAE, text encoders, tokenizer, scheduler, condition images
def make_vae(seed: int = 3):
    """A tiny 8x VAE (4 levels of 8-16 channels, 4 latent channels) for IMAGE_SIZE images, in eval mode."""
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


def write_clip_vocab(folder: Path) -> Path:
    """vocab.json + merges.txt of a tiny byte-level BPE in CLIP's format (letters, word ends, a few merges)."""
    folder = Path(folder)
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
    """A `CLIPTokenizer` over the tiny vocabulary, its files written to `folder`."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_clip_vocab(folder)), model_max_length=MAX_TOKENS)


def make_text_encoder(tokenizer, hidden: int, seed: int, projection: int | None = None):
    """A 2-layer CLIP text encoder of width `hidden` for `tokenizer`; with `projection`, the pooled and projected
    kind (SDXL's second encoder), in eval mode."""
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


def make_scheduler():
    """DDIM with Stable Diffusion's noise schedule (scaled linear betas 0.00085-0.012, as SD1.x ships)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def condition_image(seed: int, size: int = IMAGE_SIZE):
    """A random RGB condition image (PIL) of `size` x `size` pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


__all__ = [
    "IMAGE_SIZE",
    "MAX_TOKENS",
    "TINY_UNET_CONFIGS",
    "WORDS",
    "condition_image",
    "controlled_unet_output",
    "make_controlnet",
    "make_scheduler",
    "make_text_encoder",
    "make_tiny_unet",
    "make_tokenizer",
    "make_unet",
    "make_vae",
    "randomize",
    "tiny_inputs",
    "write_clip_vocab",
]
