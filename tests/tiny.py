"""Tiny random models and inputs for tests: stand-ins with each SD family's structural features (STYLE rule 8)."""

from __future__ import annotations

from pathlib import Path

import torch

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"

# Tiny stand-ins with the structural features of each family (STYLE.md rule 8).
_COMMON = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=16)
# SD1.x: conv 1x1 proj_in/out, attention_head_dim = number of heads.
_SD15 = dict(
    _COMMON,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64],
    cross_attention_dim=32,
    attention_head_dim=2,
)
TINY_UNET_CONFIGS = {
    "sd15": _SD15,
    # SD2.x: linear projections, per-level heads, another context width.
    "sd21": dict(_SD15, cross_attention_dim=24, attention_head_dim=[2, 4], use_linear_projection=True),
    # SDXL: text_time added embedding, 3 levels (10 control outputs), deeper transformers.
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
        projection_class_embeddings_input_dim=8 * 6 + 32,
    ),
}


def make_tiny_unet(family: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET_CONFIGS[family])


def randomize(module: torch.nn.Module, seed: int = 1, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter (zero convs included) random values, so parity tests see every weight."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=generator) * std + offset)
    return module


def tiny_inputs(family: str, batch: int = 2, seed: int = 2, downscale: int = 8) -> dict:
    cfg = TINY_UNET_CONFIGS[family]
    generator = torch.Generator().manual_seed(seed)
    size = cfg["sample_size"]
    inputs = {
        "sample": torch.randn(batch, cfg["in_channels"], size, size, generator=generator),
        "timestep": torch.tensor([10, 700][:batch] + [500] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, 7, cfg["cross_attention_dim"], generator=generator),
        "cond": torch.rand(batch, 3, size * downscale, size * downscale, generator=generator),
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
