"""Output sizes: multiples of the VAE factor (not of the UNet's total downsampling), checked against diffusers;
sizes from a condition image scaled to the base's native resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_tiny import to_diffusers_controlnet

from controlnet.generate.pipeline import ControlNetPipeline, output_heights
from controlnet.generate.sizes import check_size, choose_size

PROMPT = "a red cat on the blue circle"
TOL = 1e-4


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def sd_pipeline(p, nets):
    return ControlNetPipeline(p["unet"], p["vae"], p["text_encoder"], p["tokenizer"], p["scheduler"], nets)


# 72 x 40 px -> latent 9 x 5 (odd: the tiny UNet's one downsampler gives 5 x 3); 600 x 400's shape at tiny scale.
@pytest.mark.parametrize("width,height", [(72, 40), (40, 56)])
def test_sizes_that_are_not_multiples_of_the_unet_downsampling_match_diffusers(sd_parts, width, height):
    from diffusers import StableDiffusionControlNetPipeline
    from pipeline_tiny import diffusers_sd_pipeline

    p = sd_parts
    net = p["nets"][0]
    assert width % 8 == 0 and height % 8 == 0 and (width // 8) % 2 == 1  # multiple of the VAE's 8, not of 16
    cond = noise_image(width, height, seed=5)
    ours = sd_pipeline(p, [net])
    a = ours(PROMPT, [cond], steps=2, seed=3, width=width, height=height, output_type="np", guidance_scale=6.0)
    theirs = diffusers_sd_pipeline(p, StableDiffusionControlNetPipeline, controlnet=to_diffusers_controlnet(net))
    b = theirs(
        PROMPT,
        image=cond,
        width=width,
        height=height,
        num_inference_steps=2,
        generator=[torch.Generator().manual_seed(3)],
        output_type="np",
        guidance_scale=6.0,
    ).images
    assert a.array.shape == b.shape == (1, height, width, 3)
    diff = float(np.abs(a.array - b).max())
    assert diff <= TOL, f"max abs difference {diff:.2e} > {TOL}"
    assert a.settings["width"] == width and a.settings["height"] == height


def test_controlnet_residuals_fit_the_unet_skips_at_odd_latent_sizes(sdxl_parts):
    """SDXL-style tiny UNet (two downsamplers): latent 5 x 3 -> 3 x 2 -> 2 x 1; every residual fits its skip."""
    p = sdxl_parts
    unet, net = p["unet"], p["nets"][0]
    latents = torch.randn(1, 4, 5, 3)
    context = torch.randn(1, 4, unet.config.cross_attention_dim)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.tensor([[40.0, 24, 0, 0, 40, 24]])}
    with torch.no_grad():
        out = net(latents, 10, context, torch.rand(1, 3, 40, 24), added_cond_kwargs=added)
        skips = []

        def keep(module, args, output):
            skips.extend([o.shape for o in output[1]])

        hooks = [block.register_forward_hook(keep) for block in unet.down_blocks]
        eps = unet(
            latents,
            10,
            context,
            added_cond_kwargs=added,
            down_block_additional_residuals=out.down,
            mid_block_additional_residual=out.mid,
        ).sample
        for hook in hooks:
            hook.remove()
    assert eps.shape == latents.shape
    conv_in = (1, unet.config.block_out_channels[0], 5, 3)
    assert [tuple(d.shape) for d in out.down] == [conv_in, *map(tuple, skips)]
    assert [d.shape[2] for d in out.down] + [out.mid.shape[2]] == output_heights(net, 5)


def test_size_rules():
    check_size(600, 400, 8)  # web-UI sizes: multiples of 8
    with pytest.raises(ValueError, match=r"width x height = 250 x auto: both must be positive multiples of 8"):
        check_size(250, None, 8)
    with pytest.raises(ValueError, match=r"= 0 x 512"):
        check_size(0, 512, 8)
    phone = choose_size(None, None, (4032, 3024), 512, 8)
    assert (phone.width, phone.height) == (512, 384)
    assert phone.note("set --width/--height to override") == (
        "size 4032x3024 from the condition -> 512x384 (the base's native 512 px, aspect kept; set --width/--height "
        "to override)"
    )
    assert (choose_size(None, None, (600, 400), 512, 8).height) == 344  # 341.3 rounded to a multiple of 8
    assert (choose_size(None, None, (300, 1000), 1024, 8).width) == 304  # portrait: the height becomes native
    assert choose_size(None, None, (512, 512), 512, 8).note() is None  # nothing changed, nothing said
    one = choose_size(768, None, (4032, 3024), 512, 8)
    assert (one.width, one.height) == (768, 576)  # the other side follows the condition's aspect
    assert (choose_size(None, None, None, 512, 8).width, choose_size(640, 480, (4032, 3024), 512, 8).width) == (
        512,
        640,
    )


def test_pipeline_scales_a_large_condition_to_the_native_size(sd_pipe, caplog):
    assert sd_pipe.native_size == 64  # tiny UNet sample_size 8 x the VAE's 8
    cond = noise_image(200, 120, seed=1)
    with caplog.at_level("INFO", logger="controlnet.generate.pipeline"):
        result = sd_pipe(PROMPT, [cond, cond], steps=1, output_type="np")
    assert result.array.shape == (1, 40, 64, 3)  # 120 * 64 / 200 = 38.4 -> 40
    assert "size 200x120 from the condition -> 64x40" in caplog.text
