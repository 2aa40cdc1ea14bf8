"""The ControlNet: a trainable copy of a locked UNet's encoder, fed through zero convolutions (paper Sec. 3).

Paper, Sec. 3.1: a locked block F(x; Theta) gets a trainable copy F(.; Theta_c) that receives the condition c
through a zero convolution Z(.; Theta_z1) and returns into the locked model through another zero convolution:

    y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2)                              (Eq. 2)

For Stable Diffusion (Sec. 3.2) the copy is the UNet's encoder (12 blocks + the middle block); its 13 outputs
are added to the locked UNet's 12 skip connections and its middle block. Because every zero convolution starts
at weight = bias = 0, the controlled model initially equals the locked one, y_c = y (Eq. 3), and no harmful
noise reaches the pretrained features; the gradient w.r.t. a zero conv's weight is its (non-zero) input, so
training starts at the first step.

`ControlNet.from_unet` deep-copies exactly what the encoder needs from any diffusers `UNet2DConditionModel`
(SD1.x, SD2.x, SDXL, tiny configs): `conv_in`, the time embedding (and SDXL's `add_time_proj` /
`add_embedding`, class embedding and `encoder_hid_proj` when present), the down blocks and the middle block.
Parameter names equal diffusers' `ControlNetModel`, so state dicts load both ways without renaming.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from controlnet.model.hint_encoder import REFERENCE_HINT_CHANNELS, SD_LATENT_DOWNSCALE, HintEncoder

# Encoder outputs of SD1.x/2.x: conv_in + 3 x (2 resnets + downsampler) + 2 resnets = 12 skips, + the middle.
# (SDXL: conv_in + 2 x (2 resnets + downsampler) + 2 resnets = 9 skips, + the middle = 10; the count is always
# read from the UNet, `num_control_outputs`.)
NUM_CONTROL_OUTPUTS_SD15 = 13

_SUPPORTED_ADDITION_EMBEDS = (None, "text_time")


@dataclass
class ControlNetOutput:
    """Residuals for the locked UNet: `down[i]` is added to skip connection i, `mid` to the middle block."""

    down: list[torch.Tensor]  # each (B, C_i, H_i, W_i), one per UNet skip connection
    mid: torch.Tensor  # (B, C_mid, H_mid, W_mid)


@dataclass(frozen=True)
class HintConfig:
    """How the condition image is embedded (see `hint_encoder.py`)."""

    cond_channels: int = 3
    """Channels of the condition image (3 for RGB maps; 4 for e.g. inpainting with a mask channel)."""
    block_channels: tuple[int, ...] = REFERENCE_HINT_CHANNELS
    """Channels of the hint encoder's stages (reference: 16, 32, 96, 256)."""
    downscale_factor: int = SD_LATENT_DOWNSCALE
    """Condition pixels per latent pixel: 8 for SD's VAE, 1 for a pixel-space base."""

    def __post_init__(self):
        if self.cond_channels < 1:
            raise ValueError(f"cond_channels must be >= 1, got {self.cond_channels}")
        if len(self.block_channels) < 1 or min(self.block_channels) < 1:
            raise ValueError(f"block_channels must be positive channel counts, got {self.block_channels}")


def _zero_conv(channels: int) -> nn.Conv2d:
    """A 1x1 convolution with weight and bias initialised to zero (paper Sec. 3.1, 'zero convolution')."""
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def encoder_skips(encoder: nn.Module) -> tuple[list[int], list[int]]:
    """(channels, strides) of every tensor a UNet encoder (a UNet, or a ControlNet's copy of it) pushes onto its
    skip stack, in push order; stride 2 where that tensor is half the size of the one before it."""
    channels, strides = [encoder.conv_in.out_channels], [1]
    for block in encoder.down_blocks:
        channels += [resnet.out_channels for resnet in block.resnets]
        strides += [1] * len(block.resnets)
        for downsampler in block.downsamplers or []:
            channels.append(downsampler.out_channels)
            strides.append(2)
    return channels, strides


def scaled(residual: torch.Tensor, scale: float) -> torch.Tensor:
    """residual * scale; at scale 1 (training, and most generations) the residual itself: the same values, without
    an extra multiplication and its backward per output."""
    return residual if scale == 1.0 else residual * scale


class ControlBase(nn.Module):
    """What every control network shares (ControlNet, and the ablation's ControlNetLite in model/lite.py): the
    hint encoder `controlnet_cond_embedding`, one zero conv per UNet skip (`controlnet_down_blocks`) and one for
    the middle block (`controlnet_mid_block`), and how conditions and per-output scales come in."""

    hint_config: HintConfig

    @property
    def num_control_outputs(self) -> int:
        """Number of residuals: one per UNet skip connection plus the middle block (13 for SD1.5)."""
        return len(self.controlnet_down_blocks) + 1

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """c_f = E(c_i) (paper Sec. 3.3). It does not depend on t: compute it once per generation and reuse it.

        cond: (B, C_cond, H, W) in [0, 1] -> (B, C_0, H / f, W / f).
        """
        if cond.ndim != 4 or cond.shape[1] != self.hint_config.cond_channels:
            raise ValueError(
                f"cond must be (B, {self.hint_config.cond_channels}, H, W), got shape {tuple(cond.shape)}"
            )
        return self.controlnet_cond_embedding(cond.to(dtype=self.dtype))

    def _hint(self, sample: torch.Tensor, cond: torch.Tensor | None, hint: torch.Tensor | None) -> torch.Tensor:
        """E(c) for `forward`: from exactly one of `cond` and `hint`, checked against the latent's size."""
        if (cond is None) == (hint is None):
            raise ValueError("pass exactly one of `cond` (condition image) or `hint` (its precomputed embedding)")
        if hint is None:
            hint = self.embed_condition(cond)
        if hint.shape[-2:] != sample.shape[-2:]:
            raise ValueError(
                f"condition embeds to {tuple(hint.shape[-2:])} but the latent is {tuple(sample.shape[-2:])}: the "
                f"condition image must be {self.hint_config.downscale_factor}x the latent size"
            )
        return hint

    def _output_scales(self, conditioning_scale: float | Sequence[float]) -> list[float]:
        if isinstance(conditioning_scale, (int, float)):
            return [float(conditioning_scale)] * self.num_control_outputs
        scales = [float(s) for s in conditioning_scale]
        if len(scales) != self.num_control_outputs:
            raise ValueError(
                f"conditioning_scale has {len(scales)} per-block values; this ControlNet has "
                f"{self.num_control_outputs} outputs ({len(self.controlnet_down_blocks)} skips + the middle)"
            )
        return scales

    def _residuals(
        self, skips: Sequence[torch.Tensor], mid: torch.Tensor, scales: list[float]
    ) -> ControlNetOutput:
        """Each skip tensor and the middle's output through its zero convolution, times its scale."""
        down = [
            scaled(zero_conv(s), scale)
            for zero_conv, s, scale in zip(self.controlnet_down_blocks, skips, scales[:-1], strict=True)
        ]
        return ControlNetOutput(down=down, mid=scaled(self.controlnet_mid_block(mid), scales[-1]))


class ControlNet(ControlBase):
    """Trainable copy of a UNet encoder + hint encoder + zero convolutions (paper Fig. 3).

    Build it with `ControlNet.from_unet(unet)`; `forward` returns a `ControlNetOutput` whose residuals go to
    `unet(..., down_block_additional_residuals=out.down, mid_block_additional_residual=out.mid)`.
    """

    def __init__(self, unet_config: dict, hint: HintConfig, encoder_parts: dict[str, nn.Module | None]):
        super().__init__()
        self.unet_config = dict(unet_config)
        self.hint_config = hint
        self.conv_in = encoder_parts["conv_in"]
        self.time_proj = encoder_parts["time_proj"]
        self.time_embedding = encoder_parts["time_embedding"]
        self.encoder_hid_proj = encoder_parts.get("encoder_hid_proj")
        self.class_embedding = encoder_parts.get("class_embedding")
        if encoder_parts.get("add_embedding") is not None:
            self.add_time_proj = encoder_parts["add_time_proj"]
            self.add_embedding = encoder_parts["add_embedding"]
        self.controlnet_cond_embedding = HintEncoder(
            out_channels=self.conv_in.out_channels,
            cond_channels=hint.cond_channels,
            block_channels=hint.block_channels,
            downscale_factor=hint.downscale_factor,
        )
        self.down_blocks = encoder_parts["down_blocks"]
        self.mid_block = encoder_parts["mid_block"]
        self.controlnet_down_blocks = nn.ModuleList(_zero_conv(c) for c in encoder_parts["skip_channels"])
        mid_channels = self.unet_config["block_out_channels"][-1]
        self.controlnet_mid_block = _zero_conv(mid_channels)

    # ----------------------------------------------------------------------------------------------------
    # construction
    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        cond_channels: int = 3,
        hint_block_channels: Sequence[int] = REFERENCE_HINT_CHANNELS,
        hint_downscale_factor: int = SD_LATENT_DOWNSCALE,
    ) -> ControlNet:
        """Copy `unet`'s encoder (weights included) and add a fresh hint encoder and zero convolutions.

        `unet` is any diffusers `UNet2DConditionModel`; it is left untouched (the copy is deep). New layers are
        created on the UNet's device and dtype, so a UNet on the meta device gives a meta ControlNet. Every
        parameter of the result requires grad, whatever the UNet's flags were.
        """
        config = dict(unet.config)
        addition = config.get("addition_embed_type")
        if addition not in _SUPPORTED_ADDITION_EMBEDS:
            raise ValueError(
                f"unet addition_embed_type={addition!r} is not supported; expected one of "
                f"{_SUPPORTED_ADDITION_EMBEDS} (SD1.x/SD2.x: None, SDXL: 'text_time')"
            )
        if config.get("time_cond_proj_dim") is not None:
            raise ValueError("unet time_cond_proj_dim is set (LCM-style guidance embedding); not supported")
        hint = HintConfig(cond_channels, tuple(hint_block_channels), hint_downscale_factor)
        parts = {
            name: copy.deepcopy(getattr(unet, name, None))
            for name in (
                "conv_in",
                "time_proj",
                "time_embedding",
                "encoder_hid_proj",
                "class_embedding",
                "add_time_proj",
                "add_embedding",
                "down_blocks",
                "mid_block",
            )
        }
        parts["skip_channels"] = encoder_skips(unet)[0]
        param = next(unet.parameters())
        with torch.device(param.device):
            net = cls(config, hint, parts)
        # The copy is the trainable part even when the locked UNet was frozen before copying.
        return net.to(dtype=param.dtype).requires_grad_(True)

    @property
    def output_strides(self) -> list[int]:
        """Per output (the skips, then the middle): 2 where it is half the size of the output before it."""
        return [*encoder_skips(self)[1], 1]

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in backward instead of storing them (trades ~30% time for memory)."""
        func = functools.partial(checkpoint, use_reentrant=False)
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enabled
                module._gradient_checkpointing_func = func

    # ----------------------------------------------------------------------------------------------------
    # forward
    def _time_embedding(
        self, sample, timestep, encoder_hidden_states, added_cond_kwargs, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        """emb_t (+ `extra`, a union net's type embedding) (+ SDXL's pooled-text and size embedding), in the order
        diffusers adds them (float sums are not associative: the same order gives the same bits)."""
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(sample.shape[0])
        t_emb = self.time_proj(timesteps).to(dtype=sample.dtype)  # (B, C_0)
        emb = self.time_embedding(t_emb)  # (B, 4 * C_0)
        if extra is not None:
            emb = emb + extra
        if self.class_embedding is not None:
            raise ValueError("class-conditioned UNets (class_embed_type) are not supported by ControlNet")
        if getattr(self, "add_embedding", None) is not None:  # SDXL: pooled text + size/crop ids
            if (
                not added_cond_kwargs
                or "text_embeds" not in added_cond_kwargs
                or "time_ids" not in added_cond_kwargs
            ):
                raise ValueError(
                    "an SDXL-style ControlNet needs added_cond_kwargs with 'text_embeds' and 'time_ids'"
                )
            text_embeds = added_cond_kwargs["text_embeds"]  # (B, D_pooled)
            time_embeds = self.add_time_proj(added_cond_kwargs["time_ids"].flatten())
            time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)  # (B, 6 * D_time)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        return emb

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor,
        cond: torch.Tensor | None = None,
        conditioning_scale: float | Sequence[float] = 1.0,
        added_cond_kwargs: dict | None = None,
        hint: torch.Tensor | None = None,
    ) -> ControlNetOutput:
        """Residuals for the locked UNet (paper Eq. 2 applied to every encoder block).

        sample: (B, C_in, h, w) noisy latent z_t; timestep: scalar or (B,); encoder_hidden_states: (B, L, D) c_t;
        cond: (B, C_cond, h * f, w * f) condition image in [0, 1], or `hint` = `embed_condition(cond)` computed
        once and reused. conditioning_scale: one float, or one per output (len == num_control_outputs).
        """
        hint = self._hint(sample, cond, hint)
        scales = self._output_scales(conditioning_scale)
        emb = self._time_embedding(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        if self.encoder_hid_proj is not None:
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states)

        h = self.conv_in(sample) + hint  # x + Z(c) in Eq. 2, with E(c) ending in a zero conv
        skips, h = self._encode(h, emb, encoder_hidden_states)
        return self._residuals(skips, h, scales)

    def _encode(
        self, h: torch.Tensor, emb: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """F(.; Theta_c): the copied encoder from its input h (B, C_0, h, w) -> (every skip tensor, the middle's
        output), the skips in push order starting with h."""
        skips = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips.extend(res)
        if self.mid_block is not None:
            if getattr(self.mid_block, "has_cross_attention", False):
                h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h = self.mid_block(h, emb)
        return skips, h

    # ----------------------------------------------------------------------------------------------------
    # configuration
    def diffusers_config(self) -> dict:
        """Keyword arguments of diffusers' `ControlNetModel` that build an identical network."""
        keys = [
            "in_channels",
            "flip_sin_to_cos",
            "freq_shift",
            "down_block_types",
            "mid_block_type",
            "only_cross_attention",
            "block_out_channels",
            "layers_per_block",
            "downsample_padding",
            "mid_block_scale_factor",
            "act_fn",
            "norm_num_groups",
            "norm_eps",
            "cross_attention_dim",
            "transformer_layers_per_block",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "attention_head_dim",
            "num_attention_heads",
            "use_linear_projection",
            "class_embed_type",
            "addition_embed_type",
            "addition_time_embed_dim",
            "num_class_embeds",
            "upcast_attention",
            "resnet_time_scale_shift",
            "projection_class_embeddings_input_dim",
        ]
        config = {k: self.unet_config[k] for k in keys if k in self.unet_config}
        config["conditioning_channels"] = self.hint_config.cond_channels
        config["conditioning_embedding_out_channels"] = list(self.hint_config.block_channels)
        config["controlnet_conditioning_channel_order"] = "rgb"
        config["global_pool_conditions"] = False
        return _jsonable(config)


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not k.startswith("_")}
    return value
