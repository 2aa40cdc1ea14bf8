"""Text-to-image from an SD3-layout base such as `builtin-dit`, with no ControlNet: the model card's sampler.

`builtin-dit` (builtin/pretrain_dit.py) is a diffusers SD3 folder; its quality check (builtin/quality.py, `controlnet
world base-quality --base builtin-dit`) samples it here through diffusers' own `StableDiffusion3Pipeline` over the
modules the one base loader gave (generate/base.py `load_base`): the flow-matching Euler sampler, SD3's CFG and its
text path (two CLIP encoders, `max_sequence_length` zero tokens in T5's place) that the ControlNet pipeline
(generate/transformer_pipeline.py, diffusers' StableDiffusion3ControlNetPipeline) runs too. Image k of a call draws
its noise from its own generator seeded `seed + k`, as that pipeline draws a batch, so an image does not depend on how
the prompts are split into batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from controlnet.generate.transformer_base import TransformerBase

DEFAULT_BATCH_SIZE = 40  # images per pipeline call (CFG doubles it); image k is the same at any batch size


def sd3_pipeline(base: TransformerBase):
    """diffusers' StableDiffusion3Pipeline over `base`'s modules, with a fresh scheduler (the base's is not mutated)."""
    from diffusers import StableDiffusion3Pipeline

    if base.arch != "sd3":
        raise ValueError(f"base {base.name}: an {base.arch} base; expected an SD3-layout one (e.g. builtin-dit)")
    pipe = StableDiffusion3Pipeline(
        transformer=base.transformer,
        scheduler=type(base.scheduler).from_config(base.scheduler.config),
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        text_encoder_3=base.text_encoder_3,
        tokenizer_3=base.tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def float_to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """(N, H, W, 3) floats in [0, 1] (diffusers' output_type="np") -> list of (H, W, 3) uint8, as PIL output rounds."""
    return list((np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8))


@torch.no_grad()
def sample_dit(
    base: TransformerBase,
    prompts: Sequence[str],
    steps: int,
    seed: int,
    guidance_scale: float,
    max_sequence_length: int | None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    size: int | None = None,
    progress=None,
) -> list[np.ndarray]:
    """One (H, W, 3) uint8 image per prompt at `size` px (default: the base's native size), image k from noise seeded
    `seed + k`; the negative prompt is "" (the unconditional prompt the base was trained with).

    max_sequence_length: diffusers' T5 tokens (zero tokens without T5; builtin-dit: 0, its sampling.json); None = the
    pipeline's default. `progress(n)` is called with the number of images each batch finished.
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty list of strings")
    if steps < 1:
        raise ValueError(f"steps={steps}: expected >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    side = size or base.native_size
    pipe = sd3_pipeline(base)
    extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    images: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator("cpu").manual_seed(seed + start + j) for j in range(len(chunk))]
        array = pipe(
            prompt=chunk,
            height=side,
            width=side,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
            **extra,
        ).images  # (b, H, W, 3) float in [0, 1]
        images += float_to_uint8(array)
        if progress is not None:
            progress(len(chunk))
    return images


def describe_dit(base: TransformerBase) -> str:
    """One paragraph: sizes, resolution, text encoders, sampler (the UNet base's `BuiltinBase.describe` counterpart)."""
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    t, v = base.transformer.config, base.vae.config
    latent = t.sample_size
    encoders = [m for m in (base.text_encoder, base.text_encoder_2, base.text_encoder_3) if m is not None]
    return (
        f"{base.name}: {base.native_size}x{base.native_size} px RGB via AutoencoderKL latents "
        f"{v.latent_channels}x{latent}x{latent} (scaling_factor {v.scaling_factor:.4f}, {count(base.vae):.2f}M "
        f"params); SD3Transformer2DModel {count(base.transformer):.2f}M params, {t.num_layers} joint blocks x "
        f"{t.num_attention_heads} heads x {t.attention_head_dim}, patch {t.patch_size}; text encoders "
        + ", ".join(f"{type(m).__name__} {count(m):.2f}M" for m in encoders)
        + f" ({len(base.tokenizer)} tokens); scheduler {type(base.scheduler).__name__} "
        f"(shift {base.scheduler.config.get('shift')})"
    )
