"""Tiny random diffusion transformers (SD3 MMDiT, Flux) and their inputs, for tests of transformer ControlNets.

The configs are diffusers' own test configs (tests/pipelines/controlnet_sd3, controlnet_flux; see
../shared/reference/dit-controlnets.md section 2), with 4 joint / 4 double + 4 single blocks so that a ControlNet
can have fewer blocks than its base and the block mapping is exercised. Everything runs on CPU in milliseconds.
"""

from __future__ import annotations

import torch

TINY_SD3_CONFIG = dict(
    sample_size=32,
    patch_size=1,
    in_channels=8,
    num_layers=4,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=32,
    caption_projection_dim=32,
    pooled_projection_dim=64,
    out_channels=8,
    qk_norm="rms_norm",
    dual_attention_layers=(),
)
TINY_FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=4,
    num_single_layers=4,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 4, 8],
)
TEXT_TOKENS = 6  # prompt tokens of the random text embeddings


def make_sd3_transformer(seed: int = 0, **overrides):
    """A tiny `SD3Transformer2DModel` (random weights, eval mode)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**TINY_SD3_CONFIG, **overrides}).eval()


def make_flux_transformer(seed: int = 0, **overrides):
    """A tiny `FluxTransformer2DModel` (random weights, eval mode)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, **overrides}).eval()


def sd3_inputs(batch: int = 2, size: int = 8, seed: int = 1, cond_channels: int = 8) -> dict:
    """Keyword inputs shared by the SD3 base and its ControlNet, and a random condition latent `controlnet_cond`."""
    g = torch.Generator().manual_seed(seed)
    c = TINY_SD3_CONFIG
    return {
        "hidden_states": torch.randn(batch, c["in_channels"], size, size, generator=g),  # (B, C, h, w)
        "encoder_hidden_states": torch.randn(
            batch, TEXT_TOKENS, c["joint_attention_dim"], generator=g
        ),  # (B, L, D)
        "pooled_projections": torch.randn(batch, c["pooled_projection_dim"], generator=g),  # (B, D_pooled)
        "timestep": torch.tensor([500.0, 250.0][:batch] + [100.0] * max(0, batch - 2)),  # (B,)
        "controlnet_cond": torch.randn(batch, cond_channels, size, size, generator=g),  # (B, C_cond, h, w)
    }


def flux_inputs(batch: int = 2, side: int = 4, seed: int = 1) -> dict:
    """Keyword inputs shared by the Flux base and its ControlNet (packed tokens, ids) and a random packed
    condition latent `controlnet_cond`."""
    g = torch.Generator().manual_seed(seed)
    c = TINY_FLUX_CONFIG
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()  # (L_img, 3)
    return {
        "hidden_states": torch.randn(batch, side * side, c["in_channels"], generator=g),  # (B, L_img, C)
        "encoder_hidden_states": torch.randn(
            batch, TEXT_TOKENS, c["joint_attention_dim"], generator=g
        ),  # (B, L, D)
        "pooled_projections": torch.randn(batch, c["pooled_projection_dim"], generator=g),  # (B, D_pooled)
        "timestep": torch.tensor([0.5, 0.25][:batch] + [0.1] * max(0, batch - 2)),  # (B,) in [0, 1]
        "img_ids": img_ids,
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),  # (L, 3)
        "controlnet_cond": torch.randn(batch, side * side, c["in_channels"], generator=g),  # (B, L_img, C)
    }


def base_inputs(inputs: dict) -> dict:
    """The inputs without the condition: what the base transformer takes."""
    return {k: v for k, v in inputs.items() if k != "controlnet_cond"}
