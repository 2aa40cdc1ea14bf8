"""The union ControlNet: one trainable encoder copy for many condition types (xinsir's ControlNet-Union / ProMax).

It is the paper's ControlNet (model/controlnet.py: a copy of the locked UNet's encoder, joined by zero convolutions,
Eq. 2-3) with a front end that lets one network read several kinds of condition, chosen per call by a type id:

    c_f^k = E(c^k)                               one shared hint encoder for every condition k (B, C_0, h, w)
    g^k   = mean_hw(c_f^k) + T[type_k]           one token per condition: its pooled features + its type's
                                                 learned task embedding T (num_control_type, C_t)
    g^x   = mean_hw(conv_in(z_t))                one token for the noisy latent itself
    [a^1..a^K, .] = Transformer([g^1..g^K, g^x]) a small transformer over the tokens (but see below: its attention
                                                 runs over the batch axis)
    h_0   = conv_in(z_t) + sum_k (c_f^k + P(a^k)) P: a zero-initialised Linear, a per-channel shift of each
                                                 condition's features (broadcast over h, w)
    emb   = emb_t + emb_text + M(onehot types)   the set of types used enters the time embedding (SDXL-style
                                                 sinusoidal features of the 0/1 type vector through an MLP M)

The rest is the paper's: h_0 runs through the copied encoder and every output through a zero convolution. At
initialisation E's last conv, P and the output convolutions are zero, so the controlled UNet equals the locked one
(Eq. 3) whatever the conditions and types (test). With several conditions in one call each condition's features
and token are scaled by its own scale, and the outputs are not scaled again (one condition: the outputs are, as in a
plain ControlNet); `MultiControlNetUnionModel`-style use (`from_multi`) scales the outputs instead.

The fusion transformer is diffusers' `ResidualAttentionBlock`, an `nn.MultiheadAttention` built sequence-first
(batch_first=False) and given (B, K + 1, C_0): it attends across the B rows of the batch, token position by token
position, not across one row's K + 1 tokens. diffusers runs it so, as xinsir's published model code does
(xinsir6/ControlNetPlus models/controlnet_union.py, whose comment calls the input "NxLxC"), so we keep it for parity; it means a row's residuals depend on the other rows in its call (CFG's two
halves, the other images of a batch). tests/train/test_union_training.py shows it; benchmarks/paper/union.py
measures what it does to fidelity (batched vs one image per call).

Parameter names, buffers and this arithmetic equal diffusers' `ControlNetUnionModel` (test: state dicts load
strictly both ways and the residuals are equal), so xinsir's published files load as they are. Type ids are the
publishers' (`UNION_TYPES`: ComfyUI's names for the same ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.models.controlnets.controlnet_union import ResidualAttentionBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from controlnet.model.controlnet import ControlNet, ControlNetOutput, encoder_skips, scaled
from controlnet.model.hint_encoder import REFERENCE_HINT_CHANNELS, SD_LATENT_DOWNSCALE

# Condition types by id, as xinsir's model cards and ComfyUI's SetUnionControlNetType name them; Union has the first
# 6, ProMax all 8. Several names share an id (one kind of map, different annotators).
UNION_TYPES: dict[str, int] = {
    "openpose": 0,
    "depth": 1,
    "hed": 2,
    "pidi": 2,
    "scribble": 2,
    "ted": 2,
    "softedge": 2,
    "canny": 3,
    "lineart": 3,
    "anime_lineart": 3,
    "mlsd": 3,
    "normal": 4,
    "segment": 5,
    "tile": 6,
    "repaint": 7,
    # sd-webui-controlnet's union types (its API client's ControlNetUnionControlType values), and our annotators'
    "pose": 0,
    "soft_edge": 2,
    "hard_edge": 3,
    "normal_map": 4,
    "segmentation": 5,
    "seg": 5,
    "inpaint": 7,
}
# The Flux union ControlNets' modes (InstantX's and Shakker's FLUX.1-dev-Controlnet-Union model cards; ComfyUI's
# SetShakkerLabsUnionControlNetType): `FluxControlNetModel(num_mode=...)`'s `controlnet_mode_embedder` rows.
FLUX_UNION_MODES: dict[str, int] = {
    "canny": 0,
    "tile": 1,
    "depth": 2,
    "blur": 3,
    "pose": 4,
    "openpose": 4,
    "gray": 5,
    "lq": 6,
    "low_quality": 6,
}
# When the UNet has no SDXL size embedding to borrow its width from (SD1.x/2.x), the type vector's sinusoidal features
# get SDXL's width (256 per type), so that the same architecture and config keys serve every UNet base.
DEFAULT_TYPE_EMBED_DIM = 256
UNION_MID_BLOCK = "UNetMidBlock2DCrossAttn"


def describe_types(count: int, table: dict[str, int] = UNION_TYPES) -> str:
    """'openpose/pose 0, depth 1, hed/pidi/scribble/ted/softedge/soft_edge 2, ...' for a net of `count` types
    (`table`: UNION_TYPES for the UNet union nets, FLUX_UNION_MODES for Flux's)."""
    names: dict[int, list[str]] = {}
    for name, ident in table.items():
        names.setdefault(ident, []).append(name)
    return ", ".join(f"{'/'.join(names[i])} {i}" for i in range(count) if i in names)


def type_id(name_or_id: str | int, num_control_type: int, table: dict[str, int] = UNION_TYPES) -> int:
    """The id of a condition type given by name (`table`) or id, checked against the net's number of types."""
    if isinstance(name_or_id, str) and not name_or_id.strip().isdigit():
        # ComfyUI's names join the annotators of one id: "canny/lineart/anime_lineart/mlsd"
        keys = [k.strip().lower().replace("-", "_").replace(" ", "_") for k in name_or_id.split("/")]
        ids = {table.get(k) for k in keys}
        if None in ids or len(ids) != 1:
            raise ValueError(f"unknown union control type {name_or_id!r}; expected one of {', '.join(table)}")
        ident = ids.pop()
    else:
        ident = int(name_or_id)
    if not 0 <= ident < num_control_type:
        raise ValueError(
            f"union control type {name_or_id!r} (id {ident}): this net has {num_control_type} types "
            f"({describe_types(num_control_type, table)})"
        )
    return ident


@dataclass(frozen=True)
class UnionConfig:
    """The union front end's sizes (diffusers' `ControlNetUnionModel` config keys)."""

    num_control_type: int = 6
    """Condition types the net knows (xinsir Union 6, ProMax 8)."""
    num_trans_channel: int = 320
    """Width of the fusion transformer's tokens (must equal the UNet's first block channels)."""
    num_trans_head: int = 8
    num_trans_layer: int = 1
    num_proj_channel: int = 320
    """Width of the per-condition channel shift (the UNet's first block channels)."""
    type_embed_dim: int = DEFAULT_TYPE_EMBED_DIM
    """Sinusoidal features per type of the type vector (diffusers reuses `addition_time_embed_dim`)."""

    def __post_init__(self):
        for name in (
            "num_control_type",
            "num_trans_channel",
            "num_trans_head",
            "num_trans_layer",
            "type_embed_dim",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_trans_channel % self.num_trans_head:
            raise ValueError(
                f"num_trans_channel {self.num_trans_channel} must be divisible by num_trans_head {self.num_trans_head}"
            )


class UnionControlNet(ControlNet):
    """`ControlNet` + the union front end. Build it with `UnionControlNet.from_unet(unet, num_control_type=...)`.

    `forward(sample, t, text, conds=[...], types=[...])` returns the same `ControlNetOutput` as a plain ControlNet.
    """

    def __init__(self, unet_config: dict, hint, encoder_parts: dict, union: UnionConfig):
        super().__init__(unet_config, hint, encoder_parts)
        self.union_config = union
        c0 = self.conv_in.out_channels
        if union.num_trans_channel != c0 or union.num_proj_channel != c0:
            raise ValueError(
                f"num_trans_channel and num_proj_channel must equal the UNet's first block channels ({c0}), got "
                f"{union.num_trans_channel} and {union.num_proj_channel}"
            )
        # torch.randn scaled by sqrt(width), as diffusers initialises it (the tokens it is added to are pooled
        # features of that order)
        self.task_embedding = nn.Parameter(
            union.num_trans_channel**0.5 * torch.randn(union.num_control_type, union.num_trans_channel)
        )
        self.transformer_layes = nn.ModuleList(  # sic: diffusers' (and xinsir's) parameter name
            ResidualAttentionBlock(union.num_trans_channel, union.num_trans_head)
            for _ in range(union.num_trans_layer)
        )
        self.spatial_ch_projs = nn.Linear(union.num_trans_channel, union.num_proj_channel)
        nn.init.zeros_(self.spatial_ch_projs.weight)
        nn.init.zeros_(self.spatial_ch_projs.bias)
        config = self.unet_config
        self.control_type_proj = Timesteps(union.type_embed_dim, config["flip_sin_to_cos"], config["freq_shift"])
        self.control_add_embedding = TimestepEmbedding(
            union.type_embed_dim * union.num_control_type, self.time_embedding.linear_2.out_features
        )

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        num_control_type: int = 6,
        cond_channels: int = 3,
        hint_block_channels: Sequence[int] = REFERENCE_HINT_CHANNELS,
        hint_downscale_factor: int = SD_LATENT_DOWNSCALE,
        num_trans_head: int = 8,
        num_trans_layer: int = 1,
        type_embed_dim: int | None = None,
    ) -> UnionControlNet:
        """Copy `unet`'s encoder (as `ControlNet.from_unet`) and add the union front end, sized from the UNet (the
        token width is its first block's channels: diffusers' `from_unet` keeps 320, right for SDXL only).

        The type vector's features take `type_embed_dim`, else the UNet's `addition_time_embed_dim` where it has one
        (SDXL: 256), else `DEFAULT_TYPE_EMBED_DIM`. num_trans_head must divide the first block's channels."""
        if unet.config.get("mid_block_type", UNION_MID_BLOCK) != UNION_MID_BLOCK:
            raise ValueError(
                f"unet mid_block_type={unet.config['mid_block_type']!r}: a union ControlNet's middle block is "
                f"{UNION_MID_BLOCK} (diffusers' ControlNetUnionModel has no other)"
            )
        c0 = unet.config["block_out_channels"][0]
        union = UnionConfig(
            num_control_type=num_control_type,
            num_trans_channel=c0,
            num_trans_head=num_trans_head,
            num_trans_layer=num_trans_layer,
            num_proj_channel=c0,
            type_embed_dim=type_embed_dim or unet.config.get("addition_time_embed_dim") or DEFAULT_TYPE_EMBED_DIM,
        )
        plain = ControlNet.from_unet(unet, cond_channels, hint_block_channels, hint_downscale_factor)
        parts = {name: module for name, module in plain.named_children()}
        parts.update(skip_channels=encoder_skips(unet)[0])
        param = next(unet.parameters())
        with torch.device(param.device):
            net = cls(dict(unet.config), plain.hint_config, parts, union)
        return net.to(dtype=param.dtype).requires_grad_(True)

    # ----------------------------------------------------------------------------------------------------
    def control_type_vector(self, types: Sequence[int], batch: int) -> torch.Tensor:
        """(batch, num_control_type): 1 at every type used in this call, 0 elsewhere (what the time embedding reads)."""
        vector = torch.zeros(batch, self.union_config.num_control_type, device=self.device)
        vector[:, list(types)] = 1.0
        return vector

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor,
        conds: Sequence[torch.Tensor] = (),
        types: Sequence[int] = (),
        conditioning_scale: float | Sequence[float] = 1.0,
        added_cond_kwargs: dict | None = None,
        hints: Sequence[torch.Tensor] | None = None,
        control_type: torch.Tensor | None = None,
        from_multi: bool = False,
    ) -> ControlNetOutput:
        """Residuals for the locked UNet from K (condition, type) pairs.

        sample: (B, C_in, h, w); conds: K condition images (B, C_cond, h * f, w * f) in [0, 1], or `hints` = their
        `embed_condition` computed once; types: K type ids (`type_id`); conditioning_scale: one float, or one per
        condition (K > 1: each condition's features are scaled, the outputs are not). control_type: (B, T) the type
        vector, default every type in `types` (ProMax's training drops some on purpose). from_multi: scale the
        outputs by conditioning_scale[0] as a `MultiControlNetUnionModel` member.
        """
        if hints is None:
            hints = [self.embed_condition(c) for c in conds]
        hints, types = list(hints), [type_id(t, self.union_config.num_control_type) for t in types]
        if not hints or len(hints) != len(types):
            raise ValueError(
                f"pass one type per condition (at least one): got {len(hints)} and {len(types)} types"
            )
        for hint in hints:
            if hint.shape[-2:] != sample.shape[-2:]:
                raise ValueError(
                    f"condition embeds to {tuple(hint.shape[-2:])} but the latent is {tuple(sample.shape[-2:])}: the "
                    f"condition image must be {self.hint_config.downscale_factor}x the latent size"
                )
        if isinstance(conditioning_scale, (int, float)):
            scales = [float(conditioning_scale)] * len(hints)
        else:
            scales = [float(s) for s in conditioning_scale]
            if len(scales) != len(hints):
                raise ValueError(f"conditioning_scale: {len(scales)} values for {len(hints)} conditions")
        one_scale = from_multi or len(hints) == 1  # the outputs carry the scale, not the conditions

        if control_type is None:
            control_type = self.control_type_vector(types, sample.shape[0])
        emb = self._union_time_embedding(sample, timestep, encoder_hidden_states, added_cond_kwargs, control_type)
        if self.encoder_hid_proj is not None:
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states)
        h = self.front_end(sample, hints, types, None if one_scale else scales)
        skips, h = self._encode(h, emb, encoder_hidden_states)
        outputs = [scales[0] if one_scale else 1.0] * self.num_control_outputs
        return self._residuals(skips, h, outputs)

    def _union_time_embedding(
        self, sample, timestep, encoder_hidden_states, added_cond_kwargs, control_type: torch.Tensor
    ) -> torch.Tensor:
        """emb_t + the type vector's embedding (B, 4 * C_0); control_type (B, T) 0/1."""
        type_features = self.control_type_proj(control_type.flatten()).reshape(sample.shape[0], -1)  # (B, T * d)
        type_emb = self.control_add_embedding(type_features.to(sample.dtype))  # (B, 4 * C_0)
        return self._time_embedding(sample, timestep, encoder_hidden_states, added_cond_kwargs, type_emb)

    def front_end(
        self,
        sample: torch.Tensor,
        hints: Sequence[torch.Tensor],
        types: Sequence[int],
        scales: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """The encoder's input: conv_in(sample) + the K conditions' features, each shifted per channel by its token
        after the fusion transformer (B, C_0, h, w). scales: one per condition, scaling its features and token
        (several conditions at their own strengths); None: 1 (the outputs carry the scale)."""
        h = self.conv_in(sample)  # (B, C_0, h, w)
        tokens = [
            hint.mean(dim=(2, 3)) + self.task_embedding[t] for hint, t in zip(hints, types, strict=True)
        ]  # (B, C_0)
        if scales is not None:
            tokens = [token * s for token, s in zip(tokens, scales, strict=True)]
        x = torch.stack([*tokens, h.mean(dim=(2, 3))], dim=1)  # (B, K + 1, C_0)
        for layer in self.transformer_layes:
            x = layer(x)
        fused = torch.zeros_like(h)
        for k, hint in enumerate(hints):
            alpha = self.spatial_ch_projs(x[:, k])[:, :, None, None]  # (B, C_0, 1, 1)
            s = 1.0 if scales is None else scales[k]
            fused = fused + (hint + alpha if scales is None else hint * s + alpha * s)
        return h + fused

    def forward_subsets(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        subsets: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor], Sequence[int]]],
        added_cond_kwargs: dict | None = None,
    ) -> ControlNetOutput:
        """Residuals at scale 1 for a batch whose rows hold different subsets of conditions (union training, type
        dropout): `subsets` = (rows (b,) long, K hints (b, C_0, h, w), K type ids) covering every row once. Each
        subset's front end runs on its rows; the copied encoder, the costly part, runs once on the whole batch with
        each row's type vector. Row for row the same arithmetic as `forward` on that row's conditions."""
        batch = sample.shape[0]
        control_type = torch.zeros(batch, self.union_config.num_control_type, device=sample.device)
        h = None
        for rows, hints, types in subsets:
            types = [type_id(t, self.union_config.num_control_type) for t in types]
            part = self.front_end(sample.index_select(0, rows), hints, types)  # (b, C_0, h, w)
            h = part.new_zeros((batch, *part.shape[1:])) if h is None else h
            h = h.index_copy(0, rows, part)
            control_type[rows[:, None], torch.tensor(types, device=sample.device)[None, :]] = 1.0
        emb = self._union_time_embedding(sample, timestep, encoder_hidden_states, added_cond_kwargs, control_type)
        if self.encoder_hid_proj is not None:
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states)
        skips, h = self._encode(h, emb, encoder_hidden_states)
        return self._residuals(skips, h, [1.0] * self.num_control_outputs)

    def forward_unit(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor,
        control_type: int | str,
        cond: torch.Tensor | None = None,
        conditioning_scale: float | Sequence[float] = 1.0,
        added_cond_kwargs: dict | None = None,
        hint: torch.Tensor | None = None,
    ) -> ControlNetOutput:
        """One condition of one type, called as a plain ControlNet is (one generation unit): `conditioning_scale` is
        one float or one per output, applied to the outputs. With one float it is diffusers' single-condition call
        (the outputs times the scale), so per-output scales (control modes, block scales) work as for any net."""
        hint = self._hint(sample, cond, hint)
        scales = self._output_scales(conditioning_scale)
        out = self(
            sample,
            timestep,
            encoder_hidden_states,
            types=[control_type],
            hints=[hint],
            added_cond_kwargs=added_cond_kwargs,
        )
        return ControlNetOutput(
            down=[scaled(d, s) for d, s in zip(out.down, scales[:-1], strict=True)],
            mid=scaled(out.mid, scales[-1]),
        )

    def diffusers_config(self) -> dict:
        """Keyword arguments of diffusers' `ControlNetUnionModel` that build an identical network."""
        config = super().diffusers_config()
        config.pop("mid_block_type", None)  # always UNION_MID_BLOCK (from_unet refuses another)
        union = self.union_config
        config.update(
            num_control_type=union.num_control_type,
            num_trans_channel=union.num_trans_channel,
            num_trans_head=union.num_trans_head,
            num_trans_layer=union.num_trans_layer,
            num_proj_channel=union.num_proj_channel,
        )
        # diffusers sizes the type vector's features by addition_time_embed_dim; a UNet without one (SD1.x) gets ours
        config["addition_time_embed_dim"] = union.type_embed_dim
        return config
