"""The built-in tiny text-to-image base model: build it, save it, load it, sample from it.

It is a latent diffusion model in Stable Diffusion's layout (paper Sec. 3.1, "ControlNet for Text-to-Image
Diffusion"), shrunk until it trains on a CPU: a diffusers `AutoencoderKL` (64 px RGB <-> 16x16x4 latents), a
diffusers `UNet2DConditionModel` that denoises the latents with cross-attention to a tiny CLIP text encoder
(`builtin/text.py`), and a diffusers scheduler. Its folder format (generate/builtin_format.py) keeps each piece in
diffusers' layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/), so the pieces load with the usual
`from_pretrained` calls too. The shipped weights are trained by `controlnet world pretrain-base`
(builtin/pretrain.py); see weights/MODEL_CARD.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from controlnet.builtin.config import BaseModelConfig
from controlnet.builtin.text import encode_prompts
from controlnet.generate.base import denormalize_latents, load_base, normalize_latents
from controlnet.generate.builtin_format import (
    BUILTIN,
    SamplingDefaults,
    builtin_folder,
    read_base_config,
    write_builtin_folder,
)
from controlnet.generate.guidance import apply_cfg

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000
# DDPM's linear schedule (Ho et al. 2020). Its last step keeps sqrt(alpha_bar_T) ~ 0.006 of the signal, so a
# 16x16 latent's mean colour does not leak through "pure" noise (SD's scaled_linear keeps 0.068, enough at this
# size for the model to read the background colour from the noise instead of the prompt).
BETA_START = 1e-4
BETA_END = 0.02
DEFAULT_GUIDANCE_SCALE = 4.0
SHIPPED_WEIGHTS_DTYPE = torch.float16  # storage only: loaded weights are cast to the dtype the caller asks for
DEFAULT_SAMPLE_STEPS = 20


def unet_kwargs(config: BaseModelConfig) -> dict:
    """diffusers `UNet2DConditionModel` arguments for `config`."""
    levels = len(config.unet_channels)
    attn = set(config.unet_attention_levels)
    down = [("CrossAttnDownBlock2D" if i in attn else "DownBlock2D") for i in range(levels)]
    up = [("CrossAttnUpBlock2D" if (levels - 1 - i) in attn else "UpBlock2D") for i in range(levels)]
    return dict(
        sample_size=config.latent_size,
        in_channels=config.unet_channels_in,
        out_channels=config.unet_channels_in,
        block_out_channels=config.unet_channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.text.hidden_size,
        # in diffusers' UNet2DConditionModel `attention_head_dim` is the number of heads per block
        attention_head_dim=[max(1, c // config.head_dim) for c in config.unet_channels],
        norm_num_groups=config.norm_groups,
    )


def vae_kwargs(config: BaseModelConfig) -> dict:
    """diffusers `AutoencoderKL` arguments for `config` (scaling_factor is set after VAE training)."""
    blocks = len(config.vae_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups,
        sample_size=config.image_size,
        mid_block_add_attention=False,
    )


def scheduler_config() -> dict:
    """The shipped scheduler config: DPM-Solver++ for sampling; training reads the same betas via DDPMScheduler."""
    return dict(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="linspace",
    )


@dataclass
class BuiltinBase:
    """The built-in base model's parts; `vae` maps images to the latents the UNet denoises."""

    unet: torch.nn.Module  # diffusers UNet2DConditionModel on (B, 4, 16, 16) latents
    text_encoder: torch.nn.Module  # transformers CLIPTextModel, context (B, L, D)
    tokenizer: object  # transformers PreTrainedTokenizerFast (word level)
    scheduler: object  # diffusers DPMSolverMultistepScheduler
    vae: torch.nn.Module | None  # diffusers AutoencoderKL, or None for a pixel-space model
    image_size: int
    config: BaseModelConfig

    def describe(self) -> str:
        """One paragraph: sizes, resolution, vocabulary and how to drive it."""
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
        space = (
            f"pixel space {self.image_size}x{self.image_size} RGB"
            if self.vae is None
            else f"{self.image_size}x{self.image_size} px RGB via AutoencoderKL latents "
            f"{self.config.latent_channels}x{self.config.latent_size}x{self.config.latent_size} "
            f"(scaling_factor {self.vae.config.scaling_factor:.4f}, {count(self.vae) / 1e6:.2f}M params)"
        )
        return (
            f"built-in base: {space}; "
            f"UNet2DConditionModel {count(self.unet) / 1e6:.2f}M params, widths {self.config.unet_channels}, "
            f"cross-attention at levels {self.config.unet_attention_levels}; CLIPTextModel "
            f"{count(self.text_encoder) / 1e6:.2f}M params, {len(self.tokenizer)} tokens, context "
            f"{self.config.text.max_length}x{self.config.text.hidden_size}; scheduler "
            f"{type(self.scheduler).__name__} (prediction_type={self.scheduler.config.prediction_type}, "
            f"linear betas {BETA_START}..{BETA_END})"
        )

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Cross-attention context (B, L, D) for `prompts` ("" is the unconditional prompt)."""
        return encode_prompts(self.tokenizer, self.text_encoder, prompts)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) of images (B, 3, H, W) in [-1, 1] (the VAE's mean, no sampling)."""
        if self.vae is None:
            return images
        return normalize_latents(self.vae, self.vae.encode(images).latent_dist.mode())

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] from scaled latents (B, C, h, w)."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        return self.vae.decode(denormalize_latents(self.vae, latents)).sample.clamp(-1, 1)


def save_builtin_base(
    parts: dict, config: BaseModelConfig, folder: str | Path, weights_dtype: torch.dtype = SHIPPED_WEIGHTS_DTYPE
) -> None:
    """Write `parts` (unet, vae, text_encoder, tokenizer) in the built-in folder format (generate/builtin_format.py)
    with this model's scheduler, sampling defaults and `config`.

    Weights are stored as `weights_dtype` (float16 halves the package; loading casts back to the asked dtype).
    """
    from diffusers import DPMSolverMultistepScheduler

    # the sampling the model card measured travels with the weights (generate's defaults for this base)
    sampling = SamplingDefaults(guidance_scale=DEFAULT_GUIDANCE_SCALE, steps=DEFAULT_SAMPLE_STEPS)
    scheduler = DPMSolverMultistepScheduler(**scheduler_config())
    write_builtin_folder(folder, parts, scheduler, asdict(config), sampling, weights_dtype)


def load_builtin_base(
    path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> BuiltinBase:
    """Load the shipped base model (or one saved by `save_builtin_base` at `path`), offline, in eval mode.

    Through the one base loader (generate/base.py load_base), so this object and the pipeline's share one code path.
    """
    folder = Path(path) if path is not None else builtin_folder()
    config = BaseModelConfig(**read_base_config(folder))
    b = load_base(BUILTIN if path is None else folder, device=device, dtype=dtype)
    return BuiltinBase(b.unet, b.text_encoder, b.tokenizer, b.scheduler, b.vae, config.image_size, config)


def latents_to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [-1, 1] -> list of (H, W, 3) uint8."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return list(array)


@torch.no_grad()
def sample(
    base: BuiltinBase,
    prompts: Sequence[str],
    steps: int = DEFAULT_SAMPLE_STEPS,
    seed: int = 0,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
) -> list[np.ndarray]:
    """Text-to-image with classifier-free guidance (Ho & Salimans 2022), as the paper's Sec. 3.4 inference.

    Returns one (H, W, 3) uint8 image per prompt. `guidance_scale` 1 turns guidance off. Not the pipeline itself
    because pretraining's quality checks sample from models in training (no ControlNets, one noise draw for the
    whole batch, so that the model card's numbers stay reproducible); it shares the pipeline's CFG step.
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty list of strings")
    if steps < 1:
        raise ValueError(f"steps={steps}: expected >= 1")
    unet = base.unet
    device, dtype = unet.device, unet.dtype
    scheduler = type(base.scheduler).from_config(base.scheduler.config)  # fresh state: safe to call concurrently
    scheduler.set_timesteps(steps, device=device)
    batch = len(prompts)
    guided = guidance_scale != 1.0
    # 1. text context ordered [unconditional, conditional] as the pipeline's CFG step expects. Grad-free here, but
    # the encoder is the one pretraining trains, so it is encoded by builtin.text (with autograd), not generate.prompts
    context = base.encode_prompts(([""] * batch if guided else []) + list(prompts))  # (2B or B, L, D)
    # 2. initial noise from a seeded generator
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, base.config.unet_channels_in, base.config.latent_size, base.config.latent_size)
    latents = (
        torch.randn(shape, generator=generator).to(device, dtype) * scheduler.init_noise_sigma
    )  # (B, C, h, w)
    # 3. denoising loop
    for t in scheduler.timesteps:
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        eps = unet(model_in, t, encoder_hidden_states=context.to(dtype)).sample  # (2B or B, C, h, w)
        if guided:
            eps = apply_cfg(eps, guidance_scale)  # the pipeline's CFG step (generate/guidance.py)
        latents = scheduler.step(eps, t, latents).prev_sample
    # 4. decode
    return latents_to_uint8(base.decode_latents(latents))
