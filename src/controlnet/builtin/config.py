"""Typed configs of the built-in base model and its pretraining recipe (no torch import: the CLI reads them).

`TextEncoderConfig` and `BaseModelConfig` describe the architecture (saved as base_config.json beside the
weights); `PretrainConfig` is `controlnet world pretrain-base` (its field docstrings are the CLI help).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_RUN_DIR = Path.home() / ".cache" / "controlnet" / "pretrain-base"


@dataclass
class TextEncoderConfig:
    """Shape of the tiny CLIP text encoder; `vocab_size` comes from the tokenizer."""

    hidden_size: int = 64
    """width of token embeddings and of the UNet's cross-attention context"""
    num_layers: int = 2
    """transformer layers"""
    num_heads: int = 2
    """attention heads per layer"""
    intermediate_size: int = 128
    """MLP hidden width"""
    max_length: int = 24
    """tokens per prompt after padding (bos + words + eos); longer prompts are truncated"""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.max_length < 3:
            raise ValueError(f"max_length={self.max_length}: expected >= 3 (bos, a word, eos)")


@dataclass
class BaseModelConfig:
    """Architecture of the built-in base model (every field is saved in base_config.json)."""

    image_size: int = 64
    """side of the generated RGB images in pixels"""
    latent_channels: int = 4
    """channels of the VAE latent"""
    vae_channels: tuple[int, ...] = (16, 32, 64)
    """AutoencoderKL block widths; len - 1 halvings (3 blocks: 64 px -> 16x16 latent); () = pixel space"""
    unet_channels: tuple[int, ...] = (32, 64, 64)
    """UNet block widths, one per resolution"""
    unet_attention_levels: tuple[int, ...] = (1, 2)
    """which UNet resolutions (0 = full latent size) have cross-attention to the prompt"""
    layers_per_block: int = 1
    """ResNet layers per UNet down block (up blocks get one more, as diffusers does)"""
    head_dim: int = 32
    """channels per attention head"""
    norm_groups: int = 8
    """GroupNorm groups in UNet and VAE"""
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """the tiny CLIP text encoder"""

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = TextEncoderConfig(**self.text)
        self.vae_channels = tuple(self.vae_channels)
        self.unet_channels = tuple(self.unet_channels)
        self.unet_attention_levels = tuple(self.unet_attention_levels)
        if self.image_size % self.vae_scale != 0:
            raise ValueError(f"image_size={self.image_size} must be divisible by the VAE factor {self.vae_scale}")
        if any(level < 0 or level >= len(self.unet_channels) for level in self.unet_attention_levels):
            raise ValueError(
                f"unet_attention_levels={self.unet_attention_levels}: expected levels in 0..{len(self.unet_channels) - 1}"
            )
        for name in ("vae_channels", "unet_channels"):
            if any(c % self.norm_groups for c in getattr(self, name)):
                raise ValueError(
                    f"{name}={getattr(self, name)}: every width must divide by norm_groups={self.norm_groups}"
                )

    @property
    def pixel_space(self) -> bool:
        """True when there is no VAE and the UNet denoises RGB pixels directly."""
        return len(self.vae_channels) == 0

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell along one side."""
        return 1 if self.pixel_space else 2 ** (len(self.vae_channels) - 1)

    @property
    def unet_channels_in(self) -> int:
        """Channels the UNet denoises: RGB in pixel space, else the VAE latent's."""
        return 3 if self.pixel_space else self.latent_channels

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale


@dataclass
class DitModelConfig:
    """Architecture of the built-in transformer base `builtin-dit` (SD3's MMDiT layout; `--family sd3`).

    Its VAE is the shipped built-in base's (64 px <-> 16x16x4 latents), so the transformer sees 8x8 = 64 patches.
    Two CLIP text encoders as SD3 has (their penultimate hidden states joined along channels are the context, their
    pooled projections joined are the pooled vector) and no T5: SD3 runs without one, diffusers' pipeline then adds
    `max_sequence_length` zero tokens, 0 here (saved in the base's sampling.json so that every door uses it).
    """

    layers: int = 4
    """MMDiT joint blocks"""
    heads: int = 2
    """attention heads per block"""
    head_dim: int = 32
    """channels per head (width = heads * head_dim)"""
    patch_size: int = 2
    """latent pixels per patch side"""
    pos_embed_max_size: int = 16
    """patches per side of the positional-embedding grid (16: up to 128 px images)"""
    shift: float = 1.0
    """the flow-matching sigma shift (SD3 uses 3.0 at 1024 px, 4,096 patches; 64 patches need none)"""
    text: TextEncoderConfig = field(
        default_factory=lambda: TextEncoderConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64)
    )
    """each of the two CLIP text encoders (SD3 reads the penultimate layer, hence 3)"""

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = TextEncoderConfig(**self.text)
        for name in ("layers", "heads", "head_dim", "patch_size", "pos_embed_max_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.shift <= 0:
            raise ValueError(f"shift={self.shift}: expected > 0")


FAMILIES = ("unet", "sd3")  # what `controlnet world pretrain-base --family` builds


@dataclass
class PretrainConfig:
    """`controlnet world pretrain-base`: train the built-in base model from scratch on world data."""

    out: str = str(DEFAULT_RUN_DIR)
    """run folder: checkpoints, metrics.jsonl, run_config.json, tokenizer (keep it outside the repository)"""
    steps: int = 12_000
    """UNet + text-encoder optimisation steps (the cosine schedule spans them)"""
    vae_steps: int = 1_500
    """VAE optimisation steps before the UNet stage (0 for a pixel-space model)"""
    batch_size: int = 32
    """images per step"""
    vae_crop: int = 32
    """the VAE trains on random crops of this side (it is fully convolutional; 4x cheaper than 64 px); 0 = whole"""
    lr: float = 5e-4
    """peak AdamW learning rate of the UNet and text encoder"""
    vae_lr: float = 1e-3
    """AdamW learning rate of the VAE (constant after warm-up)"""
    warmup_steps: int = 500
    """linear warm-up steps of both stages"""
    min_lr_fraction: float = 0.05
    """the cosine decay ends at lr * min_lr_fraction"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    ema_decay: float = 0.999
    """EMA decay of the exported weights (warmed up as min(decay, (1 + step) / (10 + step)))"""
    uncond_prob: float = 0.1
    """fraction of captions replaced by "" (classifier-free guidance needs an unconditional model)"""
    min_snr_gamma: float = 0.0
    """min-SNR loss weighting gamma; 0 disables it"""
    scene_fraction: float = 0.25
    """fraction of each batch drawn from world scenes (captioned, no condition) instead of the fill task"""
    scene_pool: int = 4_000
    """distinct scenes rendered once at the start (a scene costs ~11 ms to render, a fill sample ~0.3 ms)"""
    fill_pool: int = 20_000
    """distinct fill samples whose VAE latents are encoded once for the UNet stage (encoding each step doubled it)"""
    grad_clip: float = 1.0
    """max gradient norm"""
    seed: int = 0
    """seed of data, initial weights and noise"""
    threads: int = 0
    """torch CPU threads (0 = torch's default); the shipped run used 1"""
    checkpoint_minutes: float = 5.0
    """minutes between checkpoints"""
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    """architecture"""
    family: str = "unet"
    """the base's layout: unet (the built-in base: SD's UNet, VAE trained first) or sd3 (builtin-dit: SD3's MMDiT
    with flow matching, on the shipped built-in base's VAE)"""
    dit: DitModelConfig = field(default_factory=DitModelConfig)
    """architecture of an sd3-family base"""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = BaseModelConfig(**self.model)
        if isinstance(self.dit, dict):
            self.dit = DitModelConfig(**self.dit)
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}: expected one of {', '.join(FAMILIES)}")
        for name in ("steps", "batch_size", "fill_pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
        for name in ("vae_steps", "warmup_steps", "threads", "scene_pool", "vae_crop"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 0")
        for name in ("uncond_prob", "scene_fraction", "min_lr_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: expected a fraction in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay}: expected 0 <= decay < 1")
        if self.lr <= 0 or self.vae_lr <= 0 or self.checkpoint_minutes <= 0:
            raise ValueError("lr, vae_lr and checkpoint_minutes must be positive")
        if self.model.pixel_space and self.vae_steps:
            raise ValueError(f"vae_steps={self.vae_steps}: a pixel-space model (vae_channels=()) has no VAE")
