"""Parameter names: diffusers' `SD3ControlNetModel` / `FluxControlNetModel` (ours) <-> the publishers' layouts.

Transformer ControlNets are published in four layouts (`formats.detect_format` tells them apart):

- diffusers names, as a diffusers folder or one `.safetensors` file (InstantX, Shakker): our names, no map;
- XLabs (x-flux `ControlNetFlux`): Black Forest Labs' Flux names plus `pos_embed_input` and a pixel-space
  `input_hint_block` (an `nn.Sequential` of 8 convs, SiLUs between them);
- Stability's SD3.5 ControlNets (`sd3.5_large_controlnet_*.safetensors`): diffusers' names for the embeddings and the
  zero linears, the SD3.5 reference code's (`mmditx.DismantledBlock`) inside the blocks, and a `control_type` scalar.

Each map is a table: publisher name -> our names. One name is a rename (the same tensor, bytes untouched); several
names mean the publisher stores one fused tensor that ours splits along dim 0, in that order (the attention's
`qkv`): reading is `torch.chunk`, writing `torch.cat`, both exact, so every round trip is byte-identical. Only the
fused `qkv` is not 1:1 in names; no tensor is transposed, scaled or reordered inside.

    XLabs (per double block N)                ours
    img_mod.lin / txt_mod.lin                 norm1.linear / norm1_context.linear
    img_attn.qkv / txt_attn.qkv               attn.to_q|to_k|to_v / attn.add_q_proj|add_k_proj|add_v_proj
    img_attn.norm.query_norm.scale (key_norm) attn.norm_q.weight (norm_k); txt_: norm_added_q / norm_added_k
    img_attn.proj / txt_attn.proj             attn.to_out.0 / attn.to_add_out
    img_mlp.0, .2 / txt_mlp.0, .2             ff.net.0.proj, ff.net.2 / ff_context.net.0.proj, ff_context.net.2
    img_in, txt_in, pos_embed_input           x_embedder, context_embedder, controlnet_x_embedder
    time_in / vector_in / guidance_in         time_text_embed.timestep_embedder / text_embedder / guidance_embedder
      .in_layer, .out_layer                     .linear_1, .linear_2
    input_hint_block.0, .2k+2, .14            input_hint_block.conv_in, .blocks.k (k < 6), .conv_out

    Stability SD3.5 (per block N)             ours (SD3SingleTransformerBlock)
    adaLN_modulation.1                        norm1.linear   (same chunk order: shift, scale, gate x 2)
    attn.qkv                                  attn.to_q|to_k|to_v
    attn.proj                                 attn.to_out.0
    mlp.fc1 / mlp.fc2                         ff.net.0.proj / ff.net.2
    (everything else: the same names)         control_type: not a parameter (config.json keeps it)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PARAMS = ("weight", "bias")
# x-flux's input_hint_block: 8 convs at even indices of an nn.Sequential (SiLU between): diffusers'
# ControlNetConditioningEmbedding with block_out_channels (16, 16, 16, 16) has conv_in, 6 blocks and conv_out.
XLABS_HINT_BLOCKS = 6
XLABS_HINT_CONV_OUT = 2 * XLABS_HINT_BLOCKS + 2  # input_hint_block.14
# Stability's SD3.5 files hold which condition the net was trained on (ComfyUI load_controlnet_sd35):
STABILITY_CONTROL_TYPES = {0: "blur", 1: "canny", 2: "depth"}
STABILITY_CONTROL_TYPE_KEY = "control_type"


def _linear(publisher: str, *ours: str) -> dict[str, tuple[str, ...]]:
    return {f"{publisher}.{p}": tuple(f"{o}.{p}" for o in ours) for p in PARAMS}


_XLABS_TOP = {
    **_linear("img_in", "x_embedder"),
    **_linear("txt_in", "context_embedder"),
    **_linear("pos_embed_input", "controlnet_x_embedder"),
    **_linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    **_linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    **_linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    **_linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    **_linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    **_linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    **_linear("input_hint_block.0", "input_hint_block.conv_in"),
    **{
        k: v
        for i in range(XLABS_HINT_BLOCKS)
        for k, v in _linear(f"input_hint_block.{2 * i + 2}", f"input_hint_block.blocks.{i}").items()
    },
    **_linear(f"input_hint_block.{XLABS_HINT_CONV_OUT}", "input_hint_block.conv_out"),
}
_XLABS_DOUBLE_BLOCK = {
    **_linear("img_mod.lin", "norm1.linear"),
    **_linear("txt_mod.lin", "norm1_context.linear"),
    **_linear("img_attn.qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
    **_linear("txt_attn.qkv", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm.scale": ("attn.norm_q.weight",),
    "img_attn.norm.key_norm.scale": ("attn.norm_k.weight",),
    "txt_attn.norm.query_norm.scale": ("attn.norm_added_q.weight",),
    "txt_attn.norm.key_norm.scale": ("attn.norm_added_k.weight",),
    **_linear("img_attn.proj", "attn.to_out.0"),
    **_linear("txt_attn.proj", "attn.to_add_out"),
    **_linear("img_mlp.0", "ff.net.0.proj"),
    **_linear("img_mlp.2", "ff.net.2"),
    **_linear("txt_mlp.0", "ff_context.net.0.proj"),
    **_linear("txt_mlp.2", "ff_context.net.2"),
}
_STABILITY_BLOCK = {
    **_linear("adaLN_modulation.1", "norm1.linear"),
    **_linear("attn.qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
    **_linear("attn.proj", "attn.to_out.0"),
    **_linear("mlp.fc1", "ff.net.0.proj"),
    **_linear("mlp.fc2", "ff.net.2"),
}


@dataclass(frozen=True)
class KeyMap:
    """One publisher layout: top-level names, per-block names (`{block_prefix}.N.` <-> `transformer_blocks.N.`) and
    the names both share (kept as they are)."""

    top: dict[str, tuple[str, ...]]
    block_prefix: str
    block: dict[str, tuple[str, ...]]
    shared: tuple[str, ...]  # name prefixes that are the same in both layouts

    def to_ours(self, key: str) -> tuple[str, ...]:
        """Publisher name -> our names (several: a fused tensor, split along dim 0). KeyError if unknown."""
        if key in self.top:
            return self.top[key]
        m = re.fullmatch(rf"{re.escape(self.block_prefix)}\.(\d+)\.(.+)", key)
        if m and m[2] in self.block:
            return tuple(f"transformer_blocks.{m[1]}.{name}" for name in self.block[m[2]])
        if key.startswith(self.shared):
            return (key,)
        raise KeyError(key)

    def to_publisher(self, names: list[str]) -> dict[str, tuple[str, ...]]:
        """Publisher name -> our names (in the fused order) for a network with parameters `names`, in their order.

        KeyError naming the first parameter the layout has no place for (e.g. Flux single blocks in XLabs')."""
        back = {ours: key for key, group in self.top.items() for ours in group}
        block_back = {ours: key for key, group in self.block.items() for ours in group}
        files: dict[str, tuple[str, ...]] = {}
        for name in names:
            if name in back:
                key = back[name]
            elif (m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)) and m[2] in block_back:
                key = f"{self.block_prefix}.{m[1]}.{block_back[m[2]]}"
            elif name.startswith(self.shared):
                key = name
            else:
                raise KeyError(name)
            files.setdefault(key, self.to_ours(key))
            if name not in files[key]:
                raise KeyError(name)
        missing = [n for group in files.values() for n in group if n not in set(names)]
        if missing:  # a fused tensor needs all its parts
            raise KeyError(missing[0])
        return files


KEY_MAPS = {
    "xlabs-flux-controlnet": KeyMap(_XLABS_TOP, "double_blocks", _XLABS_DOUBLE_BLOCK, ("controlnet_blocks.",)),
    "stability-sd35-controlnet": KeyMap(
        {},
        "transformer_blocks",
        _STABILITY_BLOCK,
        ("controlnet_blocks.", "pos_embed_input.", "time_text_embed."),
    ),
}
