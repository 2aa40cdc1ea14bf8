"""A bfloat16 generation with SD1.5-sized layers (320 channels) and weight packing on runs on every CPU: pre-packed
where oneDNN can pack bfloat16 here, the plain layers elsewhere (torch refuses to pack bf16 without AVX-512)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from controlnet.generate import cpu_packing
from controlnet.generate import pipeline as pipeline_module
from controlnet.generate.pipeline import ControlNetPipeline
from controlnet.model.controlnet import ControlNet

pytestmark = pytest.mark.cpu_isa

SD15_FIRST_LEVEL_CHANNELS = 320  # SD1.5's block_out_channels[0]: its convs and attention projections


def sd_sized_unet(cross_attention_dim: int):
    """Two levels of SD1.5's first width (1 resnet each) on the tiny text encoder's context: small in depth, SD-sized
    in every conv (320 x 320 x 3 x 3) and attention projection (320 x 320), which is what oneDNN packs."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(SD15_FIRST_LEVEL_CHANNELS, SD15_FIRST_LEVEL_CHANNELS),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,  # SD1.5's heads
        norm_num_groups=32,
    )


def test_bf16_generation_with_sd_sized_layers_and_packing_on(sd_parts, monkeypatch):
    # packing starts from MIN_PACKING_STEPS steps (where it pays); here from the first step
    monkeypatch.setattr(pipeline_module, "MIN_PACKING_STEPS", 1)
    parts = copy.deepcopy({k: sd_parts[k] for k in ("vae", "text_encoder", "tokenizer", "scheduler")})
    unet = sd_sized_unet(sd_parts["text_encoder"].config.hidden_size)
    torch.manual_seed(1)
    net = ControlNet.from_unet(unet, cond_channels=3)
    pipe = ControlNetPipeline(
        unet, parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"], [net]
    )
    pipe.to(dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.pack_cpu_weights
    cond = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)

    def generate():
        kwargs = dict(steps=1, seed=3, output_type="np", width=64, height=64, guidance_scale=5.0)
        return pipe("a red cat", [cond], **kwargs).array

    packed = generate()
    assert packed.shape == (1, 64, 64, 3) and np.isfinite(packed).all() and packed.std() > 1e-3
    # packs are kept after the loop exactly where oneDNN can pack bfloat16 on this CPU
    assert cpu_packing.holds_packs(pipe.unet, net) == cpu_packing.can_pack(torch.bfloat16)

    pipe.optimize(pack_cpu_weights=False)
    plain = generate()
    if cpu_packing.can_pack(torch.bfloat16):
        assert float(np.abs(packed - plain).mean()) <= 2e-2  # bf16 rounding in another summation order
    else:
        assert np.array_equal(packed, plain)  # the plain path both times
