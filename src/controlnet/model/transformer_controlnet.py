"""ControlNets for diffusion transformers (SD3 / SD3.5 MMDiT, Flux): the paper's trainable copy, block by block.

Paper, Sec. 3.1: a locked block F(x; Theta) gets a trainable copy F(.; Theta_c) that reads the condition c through a
zero-initialised layer Z(.; Theta_z1) and returns into the locked model through another one:

    y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2)                              (Eq. 2)

In a diffusion transformer the blocks F are the base's first N joint blocks (SD3's `JointTransformerBlock`, Flux's
double-stream `FluxTransformerBlock`, and for Flux optionally its first M single-stream blocks), x is the sequence of
image tokens and c the condition image encoded by the base's VAE into latents (the same space as x):

    Z(c; Theta_z1)   a zero-initialised patch embedding of the condition latents, added to the embedded latent tokens
                     once, before the copied blocks: SD3 `pos_embed_input` (a `PatchEmbed` over the latent channels,
                     plus an optional mask channel, `extra_conditioning_channels`), Flux `controlnet_x_embedder` (a
                     Linear over the packed latent channels);
    Z(.; Theta_z2)   one zero-initialised Linear per copied block (`controlnet_blocks.i`, Flux also
                     `controlnet_single_blocks.j`), whose output r_i is added to the hidden states after a base block.

The base has more blocks (n_base) than the copy (n_ctrl), so each base block k takes the residual of one copied block
i(k), by the rule the published models were trained with (`control_index`):

    SD3 interval     i(k) = int(k / (n_base / n_ctrl))            (diffusers' SD3Transformer2DModel; the last base block
                                                                    is `context_pre_only` and takes none)
    Flux interval    i(k) = k // ceil(n_base / n_ctrl)            (diffusers' FluxTransformer2DModel, InstantX, Shakker)
    Flux repeat      i(k) = k % n_ctrl                            (XLabs' x-flux: its 2 blocks cycle over the base's 19)

Because every Z starts at weight = bias = 0, every r_i is 0 at initialisation and the controlled transformer equals
the locked one exactly, y_c = y (Eq. 3); the gradient w.r.t. a zero layer's weight is its (non-zero) input, so
training starts at the first step.

Design: the classes below *subclass* diffusers' `SD3ControlNetModel` / `FluxControlNetModel` rather than re-implement
them beside identical parameter names. Their forward passes, attention processors, gradient checkpointing and
`from_pretrained` are diffusers' own, maintained upstream and used by diffusers' pipelines (which accept our nets by
`isinstance`), so parity with diffusers is exact by construction and diffusers folders load as they are. What we add
is the paper's part and its checks: `from_transformer` (a faithful trainable copy of any base of the family, which
diffusers' constructors are not: SD3's writes `num_layers` into the *base's* config dict, Flux's builds 24 heads of 128
whatever the base has unless told), clear input errors, the block mapping, and folders saved under diffusers' class
names. A copy of the network in this file would be a third implementation to keep in step (UNet ControlNets are ours
because the paper's hint encoder and SD layouts are; these nets have no such part).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from diffusers import FluxControlNetModel, FluxTransformer2DModel, SD3ControlNetModel, SD3Transformer2DModel
from torch import nn

# How a ControlNet with fewer blocks than its base feeds the base's blocks (see the module docstring): the rules as
# each base computes them, and the mappings a Flux net offers (its interval rule, or XLabs' repeat).
SD3_INTERVAL = "sd3-interval"
FLUX_INTERVAL = "flux-interval"
REPEAT = "repeat"
RULES = (SD3_INTERVAL, FLUX_INTERVAL, REPEAT)
INTERVAL = "interval"
BLOCK_MAPPINGS = (INTERVAL, REPEAT)

# Flux packs 2x2 latent pixels into one token (16 VAE channels -> 64 features); an XLabs-style pixel-space hint is
# packed the same way after its 8x-downsampling hint encoder.
FLUX_LATENT_PACKING = 2

# The configuration keys a ControlNet takes from its base (all of its other settings are its own).
_SD3_BASE_KEYS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "out_channels",
    "pos_embed_max_size",
    "dual_attention_layers",
    "qk_norm",
)
_FLUX_BASE_KEYS = (
    "patch_size",
    "in_channels",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
    "axes_dims_rope",
)


def control_index(base_index: int, n_base: int, n_ctrl: int, rule: str) -> int:
    """Which of a ControlNet's n_ctrl block outputs base block `base_index` (of n_base) adds.

    rule: one of RULES (module docstring). Written as diffusers' base transformers
    compute it, float division included, so the index is the one they use, not merely equal in exact arithmetic.
    """
    if not 0 <= base_index < n_base or n_ctrl < 1:
        raise ValueError(f"need 0 <= base_index < n_base and n_ctrl >= 1, got {base_index}, {n_base}, {n_ctrl}")
    if rule == SD3_INTERVAL:
        return int(base_index / (n_base / n_ctrl))
    if rule == FLUX_INTERVAL:
        return base_index // int(math.ceil(n_base / n_ctrl))
    if rule == REPEAT:
        return base_index % n_ctrl
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def per_base_block(samples: list[torch.Tensor] | None, n_base: int, rule: str) -> list[torch.Tensor] | None:
    """One residual per base block: `samples[control_index(k, ...)]` for k < n_base (None stays None).

    Fed to the base, n_base residuals map one to one under every rule, so residuals of nets with different block
    counts can be added per base block (paper Sec. 3.4: ControlNets compose by adding their outputs).
    """
    if samples is None:
        return None
    return [samples[control_index(k, n_base, len(samples), rule)] for k in range(n_base)]


def _diffusers_json(json_string: str, class_name: str) -> str:
    """A config.json as diffusers writes it for `class_name`, so any diffusers loader (AutoModel too) reads it."""
    config = json.loads(json_string)
    config["_class_name"] = class_name
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _layer_count(name: str, value: int, low: int, high: int, why: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high} ({why}), got {value!r}")
    return value


def _trainable_copy(
    cls: type[nn.Module], config: dict, base: nn.Module, copied: list[str], zero: tuple[str, ...]
) -> nn.Module:
    """A `cls(**config)` whose `copied` parts hold copies of `base`'s weights and whose `zero` parts start at 0.

    Built on the meta device and materialised once in the base's dtype and device: a bf16 base gives a bf16 net with
    no float32 copy and no random initialisation of parts about to be overwritten; a meta base gives a meta net. The
    parts that are neither copied nor zero (XLabs' hint encoder and x embedder, a union net's mode embedding) get
    torch's default initialisation, as diffusers' constructor gives them.
    """
    param = next(base.parameters())
    with torch.device("meta"):
        net = cls(**config)
    nn.Module.to(net, dtype=param.dtype)  # still meta (diffusers' `ModelMixin.to` would warn about dtype casts)
    net.to_empty(device=param.device)
    stray = [name for name, _ in net.named_buffers() if not _within(name.rsplit(".", 1)[0], copied)]
    assert not stray, f"buffers outside the copied parts would stay uninitialised: {stray}"
    if param.device.type != "meta":
        with torch.no_grad():
            for name, module in net.named_modules():
                if not list(module.parameters(recurse=False)) or _within(name, copied):
                    continue
                if _within(name, zero):  # Z(.; Theta_z1), Z(.; Theta_z2) of Eq. 2
                    for p in module.parameters(recurse=False):
                        p.zero_()
                else:
                    assert hasattr(module, "reset_parameters"), f"{name}: {type(module).__name__} has no init"
                    module.reset_parameters()
    for part in copied:
        try:
            net.get_submodule(part).load_state_dict(base.get_submodule(part).state_dict(), strict=True)
        except RuntimeError as error:  # an invariant: the net was built from this base's own configuration
            raise AssertionError(f"copying the base's {part} failed: {error}") from error
    # The copy is the trainable part even when the locked base was frozen before copying.
    return net.requires_grad_(True)


def _within(name: str, parts) -> bool:
    return any(name == part or name.startswith(part + ".") for part in parts)


class SD3ControlNet(SD3ControlNetModel):
    """The trainable copy of an `SD3Transformer2DModel`'s first N joint blocks (SD3, SD3.5 Medium/Large).

    Build it with `SD3ControlNet.from_transformer(base, num_layers=...)`, or load a diffusers folder with
    `from_pretrained` (SD3.5 Large's published nets, whose blocks are single-stream and not a copy, load this way).
    `forward` is diffusers': its `.controlnet_block_samples` (one (B, L_img, D) per copied block) go to
    `base(..., **net.residual_kwargs(out))`.
    """

    @classmethod
    def from_transformer(
        cls,
        base: SD3Transformer2DModel,
        num_layers: int = 12,
        extra_conditioning_channels: int = 0,
        force_zeros_for_pooled_projection: bool = False,
    ) -> SD3ControlNet:
        """Copy `base`'s patch embedding, time/text embeddings, context embedder and first `num_layers` joint blocks
        (weights included) and add the zero-initialised `pos_embed_input` and `controlnet_blocks`.

        num_layers: copied blocks, 1..n_base - 1 (the base's last block is `context_pre_only` and takes no residual;
        InstantX's SD3 canny copies 6 of 24, tensorart's SD3.5 Medium 23 of 24). extra_conditioning_channels: channels
        beside the condition latents (1 for an inpainting mask). force_zeros_for_pooled_projection: False (ours) has
        diffusers' pipeline feed the copy the base's pooled text vector and VAE-encode the condition like the latent
        (shift and scale), the copy reading what the locked blocks read (Sec. 3.1); True is InstantX's convention
        (zeros for the pooled vector, no VAE shift), the default of diffusers' own `from_transformer`.
        `base` is left untouched; the result is on its device and dtype (the meta device gives a meta net), every
        parameter requiring grad.
        """
        if not isinstance(base, SD3Transformer2DModel):
            raise ValueError(f"base must be a diffusers SD3Transformer2DModel, got {type(base).__name__}")
        n_base = len(base.transformer_blocks)
        num_layers = _layer_count(
            "num_layers",
            num_layers,
            1,
            n_base - 1,
            f"the base has {n_base} joint blocks, its last context_pre_only",
        )
        if extra_conditioning_channels < 0:
            raise ValueError(f"extra_conditioning_channels must be >= 0, got {extra_conditioning_channels}")
        config = {key: base.config[key] for key in _SD3_BASE_KEYS}
        config.update(
            num_layers=num_layers,
            extra_conditioning_channels=extra_conditioning_channels,
            force_zeros_for_pooled_projection=force_zeros_for_pooled_projection,
        )
        copied = ["pos_embed", "time_text_embed", "context_embedder"]
        copied += [f"transformer_blocks.{i}" for i in range(num_layers)]
        return _trainable_copy(cls, config, base, copied, zero=("pos_embed_input", "controlnet_blocks"))

    def control_index(self, base_index: int, n_base: int) -> int:
        """The output of this net that base block `base_index` (of n_base) adds (SD3's interval rule)."""
        return control_index(base_index, n_base, len(self.controlnet_blocks), SD3_INTERVAL)

    def residual_kwargs(self, out: Any, base_blocks: int | None = None) -> dict:
        """Keyword arguments for `SD3Transformer2DModel.forward` from this net's output (`None`: no control).

        base_blocks: expand to one residual per base block (`per_base_block`), so that several nets' kwargs add.
        """
        if out is None:
            return {}
        samples = list(out.controlnet_block_samples)
        if base_blocks is not None:
            samples = per_base_block(samples, base_blocks, SD3_INTERVAL)
        return {"block_controlnet_hidden_states": samples}

    def forward(self, hidden_states: torch.Tensor, controlnet_cond: torch.Tensor, *args, **kwargs):
        """diffusers' forward (same arguments and output), after checking the condition against the latent.

        hidden_states: (B, C, h, w) noisy latent; controlnet_cond: (B, C + extra_conditioning_channels, h, w) the
        condition image's VAE latents (and mask). Returns `.controlnet_block_samples`: one (B, L_img, D) per block.
        """
        expected = self.config.in_channels + self.config.extra_conditioning_channels
        if self.pos_embed is not None and (
            controlnet_cond.ndim != 4
            or controlnet_cond.shape[1] != expected
            or controlnet_cond.shape[-2:] != hidden_states.shape[-2:]
            or controlnet_cond.shape[0] not in (1, hidden_states.shape[0])
        ):
            raise ValueError(
                f"controlnet_cond must be (B or 1, {expected}, h, w) latents matching hidden_states "
                f"{tuple(hidden_states.shape)}, got {tuple(controlnet_cond.shape)}"
            )
        return super().forward(hidden_states, controlnet_cond, *args, **kwargs)

    def to_json_string(self) -> str:
        return _diffusers_json(super().to_json_string(), SD3ControlNetModel.__name__)


class FluxControlNet(FluxControlNetModel):
    """The trainable copy of a `FluxTransformer2DModel`'s first N double blocks (and optionally M single blocks).

    Build it with `FluxControlNet.from_transformer(base, num_layers=..., num_single_layers=...)`, or load a diffusers
    folder with `from_pretrained`. `forward` is diffusers': its `.controlnet_block_samples` and
    `.controlnet_single_block_samples` (one (B, L_img, D) per copied block, None when there are none) go to
    `base(..., **net.residual_kwargs(out))`.
    """

    @classmethod
    def from_transformer(
        cls,
        base: FluxTransformer2DModel,
        num_layers: int = 4,
        num_single_layers: int = 0,
        pixel_hint: bool = False,
        num_mode: int | None = None,
    ) -> FluxControlNet:
        """Copy `base`'s position, time/text (and guidance) embeddings, context and image embedders, first
        `num_layers` double blocks and first `num_single_layers` single blocks (weights included); add the
        zero-initialised `controlnet_x_embedder` and one zero-initialised Linear per copied block.

        num_layers: 1..n_double (InstantX Union 5, Shakker Union-Pro-2.0 6, x-flux 2); num_single_layers: 0..n_single
        (InstantX Union 10). pixel_hint: XLabs' layout, the condition entering as a pixel image through a hint
        encoder (`input_hint_block`, 8 convs, the last zero-initialised, 8x down, packed 2x2) and a plain Linear,
        mapped by the repeat rule. num_mode: a union net's number of condition types (`controlnet_mode_embedder`).
        `base` is left untouched; the result is on its device and dtype, every parameter requiring grad.
        """
        if not isinstance(base, FluxTransformer2DModel):
            raise ValueError(f"base must be a diffusers FluxTransformer2DModel, got {type(base).__name__}")
        n_double, n_single = len(base.transformer_blocks), len(base.single_transformer_blocks)
        num_layers = _layer_count("num_layers", num_layers, 1, n_double, f"the base has {n_double} double blocks")
        num_single_layers = _layer_count(
            "num_single_layers", num_single_layers, 0, n_single, f"the base has {n_single} single blocks"
        )
        if num_mode is not None and (not isinstance(num_mode, int) or num_mode < 1):
            raise ValueError(f"num_mode must be None or a positive number of condition types, got {num_mode!r}")
        config = {key: base.config[key] for key in _FLUX_BASE_KEYS}
        config.update(num_layers=num_layers, num_single_layers=num_single_layers, num_mode=num_mode)
        if pixel_hint:
            packed = FLUX_LATENT_PACKING**2
            if base.config.in_channels % packed:
                raise ValueError(
                    f"pixel_hint needs the base's in_channels divisible by {packed} (2x2 packed latents), got "
                    f"{base.config.in_channels}"
                )
            # The hint encoder's output is packed like the latents: its channels x 2 x 2 = the base's in_channels.
            config.update(
                conditioning_embedding_channels=base.config.in_channels // packed, patch_size=FLUX_LATENT_PACKING
            )
        copied = ["time_text_embed", "context_embedder", "x_embedder"]
        copied += [f"transformer_blocks.{i}" for i in range(num_layers)]
        copied += [f"single_transformer_blocks.{i}" for i in range(num_single_layers)]
        # XLabs' condition enters through its hint encoder, whose last conv is the zero layer; its x embedder is plain
        hint_zero = ("input_hint_block.conv_out",) if pixel_hint else ("controlnet_x_embedder",)
        zero = ("controlnet_blocks", "controlnet_single_blocks", *hint_zero)
        return _trainable_copy(cls, config, base, copied, zero)

    @property
    def blocks_repeat(self) -> bool:
        """Whether the base takes this net's outputs by the repeat rule: XLabs' nets (those with a pixel-space
        `input_hint_block`) do, as diffusers' Flux ControlNet pipeline decides."""
        return self.input_hint_block is not None

    def control_index(self, base_index: int, n_base: int, single: bool = False) -> int:
        """The output of this net that base (double, or `single`) block `base_index` of n_base adds."""
        n_ctrl = len(self.controlnet_single_blocks if single else self.controlnet_blocks)
        rule = REPEAT if self.blocks_repeat and not single else FLUX_INTERVAL
        return control_index(base_index, n_base, n_ctrl, rule)

    def residual_kwargs(
        self, out: Any, base_blocks: tuple[int, int] | None = None, mapping: str | None = None
    ) -> dict:
        """Keyword arguments for `FluxTransformer2DModel.forward` from this net's output (`None`: no control).

        base_blocks: (n_double, n_single) of the base: expand to one residual per base block (`per_base_block`), so
        several nets' kwargs add. mapping: "interval" or "repeat" for the double blocks (default: `blocks_repeat`;
        diffusers' base maps single blocks by the interval rule only).
        """
        if out is None:
            return {}
        if mapping is None:
            mapping = REPEAT if self.blocks_repeat else INTERVAL
        if mapping not in BLOCK_MAPPINGS:
            raise ValueError(f"mapping must be one of {BLOCK_MAPPINGS}, got {mapping!r}")
        double, single = out.controlnet_block_samples, out.controlnet_single_block_samples
        if base_blocks is None:
            return {
                "controlnet_block_samples": double,
                "controlnet_single_block_samples": single,
                "controlnet_blocks_repeat": mapping == REPEAT,
            }
        n_double, n_single = base_blocks
        return {
            "controlnet_block_samples": per_base_block(
                double, n_double, REPEAT if mapping == REPEAT else FLUX_INTERVAL
            ),
            "controlnet_single_block_samples": per_base_block(single, n_single, FLUX_INTERVAL),
            "controlnet_blocks_repeat": False,
        }

    def forward(self, hidden_states: torch.Tensor, controlnet_cond: torch.Tensor, *args, **kwargs):
        """diffusers' forward (same arguments and output), after checking the condition against the latent.

        hidden_states: (B, L_img, C) packed noisy latent; controlnet_cond: (B, L_img, C) the condition image's packed
        VAE latents, or for a pixel-hint (XLabs) net (B, 3, H, W) the image itself, H = h * 8 * 2.
        Returns `.controlnet_block_samples` / `.controlnet_single_block_samples`: one (B, L_img, D) per block.
        """
        if self.input_hint_block is None and (
            controlnet_cond.ndim != 3
            or controlnet_cond.shape[1:] != hidden_states.shape[1:]
            or controlnet_cond.shape[0] not in (1, hidden_states.shape[0])
        ):
            raise ValueError(
                f"controlnet_cond must be packed latents shaped like hidden_states {tuple(hidden_states.shape)}, "
                f"got {tuple(controlnet_cond.shape)}"
            )
        if self.input_hint_block is not None and controlnet_cond.ndim != 4:
            raise ValueError(
                f"this net (XLabs layout) takes the condition image (B, 3, H, W), got {tuple(controlnet_cond.shape)}"
            )
        return super().forward(hidden_states, controlnet_cond, *args, **kwargs)

    def to_json_string(self) -> str:
        return _diffusers_json(super().to_json_string(), FluxControlNetModel.__name__)
