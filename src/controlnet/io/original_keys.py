"""Parameter names: diffusers/ours <-> the original `cldm` ControlNet (lllyasviel/ControlNet, `control_model.*`).

Our module uses diffusers' `ControlNetModel` names. The original layout numbers blocks as the LDM UNet does:

    conv_in                                   input_blocks.0.0
    down_blocks.i.resnets.j                   input_blocks.{1 + i (L + 1) + j}.0   (L = layers_per_block)
    down_blocks.i.attentions.j                input_blocks.{1 + i (L + 1) + j}.1
    down_blocks.i.downsamplers.0.conv         input_blocks.{(i + 1)(L + 1)}.0.op
    mid_block.resnets.r / attentions.a        middle_block.{2 r} / middle_block.{2 a + 1}
    time_embedding.linear_1 / linear_2        time_embed.0 / time_embed.2
    add_embedding.linear_1 / linear_2         label_emb.0.0 / label_emb.0.2           (SDXL)
    controlnet_cond_embedding.conv_in         input_hint_block.0
    controlnet_cond_embedding.blocks.k        input_hint_block.{2 k + 2}   (odd indices are parameterless SiLU)
    controlnet_cond_embedding.conv_out        input_hint_block.{2 K + 2}   (K = number of blocks)
    controlnet_down_blocks.k                  zero_convs.k.0
    controlnet_mid_block                      middle_block_out.0

and inside ResNet blocks norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut are in_layers.0, in_layers.2,
emb_layers.1, out_layers.0, out_layers.3, skip_connection. Transformer internals share names. The rules are a
bijection, so original -> ours -> original reproduces every key; `tests/io` checks them against diffusers'
own `convert_controlnet_checkpoint` on the reference fixture.
"""

from __future__ import annotations

import re

ORIGINAL_CONTROL_PREFIX = "control_model."

_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_RENAMES_BACK = {v: k for k, v in _RESNET_RENAMES.items()}
_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "controlnet_cond_embedding.conv_in": "input_hint_block.0",
    "controlnet_mid_block": "middle_block_out.0",
}
_FIXED_BACK = {v: k for k, v in _FIXED.items()}


def _split_param(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def _resnet_inner(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return ".".join(filter(None, [_RESNET_RENAMES.get(head, head), tail]))


def _resnet_inner_back(rest: str) -> str:
    for original, ours in _RESNET_RENAMES_BACK.items():
        if rest == original or rest.startswith(original + "."):
            return ours + rest[len(original) :]
    return rest


def to_original(name: str, layers_per_block: int, num_hint_blocks: int) -> str:
    """Our (diffusers) parameter name -> original `cldm` name, without the `control_model.` prefix."""
    module, param = _split_param(name)
    if module in _FIXED:
        return f"{_FIXED[module]}.{param}"
    if module == "controlnet_cond_embedding.conv_out":
        return f"input_hint_block.{2 * num_hint_blocks + 2}.{param}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module):
        return f"input_hint_block.{2 * int(m[1]) + 2}.{param}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
        return f"zero_convs.{m[1]}.0.{param}"
    stride = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"input_blocks.{1 + int(m[1]) * stride + int(m[2])}.0.{_resnet_inner(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
        return f"input_blocks.{1 + int(m[1]) * stride + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
        return f"input_blocks.{(int(m[1]) + 1) * stride}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", name):
        return f"middle_block.{2 * int(m[1])}.{_resnet_inner(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.(\d+)\.(.+)", name):
        return f"middle_block.{2 * int(m[1]) + 1}.{m[2]}"
    raise KeyError(f"no original-format name for parameter {name!r}")


def from_original(name: str, layers_per_block: int, num_hint_blocks: int) -> str:
    """Original `cldm` name (prefix already stripped) -> our (diffusers) parameter name."""
    module, param = _split_param(name)
    if module in _FIXED_BACK:
        return f"{_FIXED_BACK[module]}.{param}"
    if m := re.fullmatch(r"input_hint_block\.(\d+)", module):
        index = int(m[1])
        if index == 0 or index % 2:
            raise KeyError(f"unexpected hint-encoder key {name!r}")
        k = index // 2 - 1
        return f"controlnet_cond_embedding.{'conv_out' if k == num_hint_blocks else f'blocks.{k}'}.{param}"
    if m := re.fullmatch(r"zero_convs\.(\d+)\.0", module):
        return f"controlnet_down_blocks.{m[1]}.{param}"
    stride = layers_per_block + 1
    if m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.(.+)", name):
        return f"down_blocks.{int(m[1]) // stride - 1}.downsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", name):
        block, layer = divmod(int(m[1]) - 1, stride)
        if m[2] == "0":
            return f"down_blocks.{block}.resnets.{layer}.{_resnet_inner_back(m[3])}"
        return f"down_blocks.{block}.attentions.{layer}.{m[3]}"
    if m := re.fullmatch(r"middle_block\.(\d+)\.(.+)", name):
        index = int(m[1])
        if index % 2 == 0:
            return f"mid_block.resnets.{index // 2}.{_resnet_inner_back(m[2])}"
        return f"mid_block.attentions.{index // 2}.{m[2]}"
    raise KeyError(f"unexpected original-format ControlNet key {name!r}")


def strip_control_prefix(state: dict) -> dict:
    """The `control_model.*` part of an original file (combined v1.0 files also hold the SD model), unprefixed."""
    if any(k.startswith(ORIGINAL_CONTROL_PREFIX) for k in state):
        n = len(ORIGINAL_CONTROL_PREFIX)
        return {k[n:]: v for k, v in state.items() if k.startswith(ORIGINAL_CONTROL_PREFIX)}
    return dict(state)
