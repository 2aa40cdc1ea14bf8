"""SD3 / SD3.5 and Flux bases from the single files users have: checked from their headers, then loaded.

The layouts (../shared/reference/dit-controlnets.md; diffusers' `loaders/single_file_utils.py` is the reference the
tests compare with):
- Stability's SD3 / SD3.5 checkpoints (`sd3.5_large.safetensors`): the MMDiT under `model.diffusion_model.`
  (`joint_blocks.N.x_block` / `.context_block`), and optionally the VAE (`first_stage_model.`, LDM names) and the text
  encoders in transformers' names under `text_encoders.clip_l.transformer.`, `.clip_g.` and `.t5xxl.`;
- Black Forest Labs' Flux transformer files (`flux1-dev.safetensors`: `double_blocks.N`, `single_blocks.N`, sometimes
  under `model.diffusion_model.`), with the VAE apart (`ae.safetensors`, LDM names) and the text encoders as folders.

Renames are the tables below: publisher name -> our (diffusers') names. Several names mean one fused tensor that ours
splits along dim 0 (the attention's `qkv`; Flux's single-block `linear1` = q, k, v and the MLP input): the parts are
views, so a memory-mapped file in the dtype asked for is loaded without a copy. `SWAPPED` entries hold (shift, scale)
where diffusers' `AdaLayerNormContinuous` takes (scale, shift): the two halves change places (a small copy).
`to_publisher` is the exact inverse (`torch.cat`), used to write test files in the publishers' layouts. diffusers'
own Flux converter fixes the width at 3072, so that a tiny file cannot go through it; these tables take the width
from the file.

Configs come from the shapes (depth from `joint_blocks.N` / `double_blocks.N`, widths from the embedders, the head
width from the q norm); what no weight holds (Flux's rotary axes, the VAE's groups and latent scale, CLIP's activation)
is in io/configs/{sd3,flux}_file.json, and `configs` ({"transformer": {...}, "vae": {...}, "text_encoder": {...}},
the CLI's --base-config) replaces any of it per component.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from controlnet.errors import CheckpointError
from controlnet.io.formats import refuse_unreadable
from controlnet.io.safe_load import GGUF_MAGIC, LazyWeights
from controlnet.io.transformer_keys import KEY_MAPS, PARAMS

CONFIG_DIR = Path(__file__).parent / "configs"
MODEL_PREFIX = "model.diffusion_model."  # Stability's files, and some Flux files
VAE_PREFIX = "first_stage_model."  # the VAE inside a Stability checkpoint (LDM names)
# SD3 checkpoints with their text encoders inside: transformers' own names under these prefixes.
SD3_ENCODER_PREFIXES = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}
# The pipeline's text encoder slots per family: which option fills each, and the transformers class.
ENCODERS = {
    "sd3": {
        "text_encoder": ("clip_l", "CLIPTextModelWithProjection"),
        "text_encoder_2": ("clip_g", "CLIPTextModelWithProjection"),
        "text_encoder_3": ("t5", "T5EncoderModel"),
    },
    "flux": {"text_encoder": ("clip_l", "CLIPTextModel"), "text_encoder_2": ("t5", "T5EncoderModel")},
}
T5_SLOT = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}
SD3_HEAD_DIM = 64  # every SD3/SD3.5 model: hidden = 64 x depth; the head width where no q norm holds it
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


# ------------------------------------------------------------------------------------------------------------
# key tables: publisher name -> our names (fused tensors split along dim 0, in this order)
def _linear(publisher: str, *ours: str) -> dict[str, tuple[str, ...]]:
    # marked duplication: transformer_keys.py's own helper for the ControlNet tables
    return {f"{publisher}.{p}": tuple(f"{o}.{p}" for o in ours) for p in PARAMS}


_FLUX_TOP_PARTS = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.")
_FINAL = {
    **_linear("final_layer.linear", "proj_out"),
    **_linear("final_layer.adaLN_modulation.1", "norm_out.linear"),
}
SD3_TOP = {
    "pos_embed": ("pos_embed.pos_embed",),  # the fixed sin-cos table (a buffer diffusers saves)
    **_linear("x_embedder.proj", "pos_embed.proj"),
    **_linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    **_linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    **_linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    **_linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    **_linear("context_embedder", "context_embedder"),
    **_FINAL,
}
SD3_BLOCK = {  # joint_blocks.N. -> transformer_blocks.N.
    **_linear("x_block.attn.qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
    **_linear("context_block.attn.qkv", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    **_linear("x_block.attn.proj", "attn.to_out.0"),
    **_linear("context_block.attn.proj", "attn.to_add_out"),
    **_linear("x_block.attn2.qkv", "attn2.to_q", "attn2.to_k", "attn2.to_v"),
    **_linear("x_block.attn2.proj", "attn2.to_out.0"),
    **_linear("x_block.adaLN_modulation.1", "norm1.linear"),
    **_linear("context_block.adaLN_modulation.1", "norm1_context.linear"),
    **_linear("x_block.mlp.fc1", "ff.net.0.proj"),
    **_linear("x_block.mlp.fc2", "ff.net.2"),
    **_linear("context_block.mlp.fc1", "ff_context.net.0.proj"),
    **_linear("context_block.mlp.fc2", "ff_context.net.2"),
    "x_block.attn.ln_q.weight": ("attn.norm_q.weight",),
    "x_block.attn.ln_k.weight": ("attn.norm_k.weight",),
    "context_block.attn.ln_q.weight": ("attn.norm_added_q.weight",),
    "context_block.attn.ln_k.weight": ("attn.norm_added_k.weight",),
    "x_block.attn2.ln_q.weight": ("attn2.norm_q.weight",),
    "x_block.attn2.ln_k.weight": ("attn2.norm_k.weight",),
}
FLUX_TOP = {
    **{k: v for k, v in KEY_MAPS["xlabs-flux-controlnet"].top.items() if k.startswith(_FLUX_TOP_PARTS)},
    **_FINAL,
}
FLUX_DOUBLE_BLOCK = KEY_MAPS[
    "xlabs-flux-controlnet"
].block  # double_blocks.N. -> transformer_blocks.N. (BFL's names)
FLUX_SINGLE_BLOCK = {  # single_blocks.N. -> single_transformer_blocks.N.
    **_linear("modulation.lin", "norm.linear"),
    **_linear("linear1", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),  # q, k, v: `inner` rows each
    "norm.query_norm.scale": ("attn.norm_q.weight",),
    "norm.key_norm.scale": ("attn.norm_k.weight",),
    **_linear("linear2", "proj_out"),
}
# (publisher block prefix, our block prefix, table) per family
BLOCKS = {
    "sd3": (("joint_blocks", "transformer_blocks", SD3_BLOCK),),
    "flux": (
        ("double_blocks", "transformer_blocks", FLUX_DOUBLE_BLOCK),
        ("single_blocks", "single_transformer_blocks", FLUX_SINGLE_BLOCK),
    ),
}
TOP = {"sd3": SD3_TOP, "flux": FLUX_TOP}
# (shift, scale) in the publishers' layout, (scale, shift) in diffusers': the final norm, and SD3's last context norm
SWAPPED = ("final_layer.adaLN_modulation.1.",)
SD3_LAST_CONTEXT_NORM = "context_block.adaLN_modulation.1."


def _swap(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _split(tensor: torch.Tensor, names: tuple[str, ...], inner: int) -> list[torch.Tensor]:
    if len(names) == 1:
        return [tensor]
    if names[-1].endswith("proj_mlp.weight") or names[-1].endswith("proj_mlp.bias"):  # Flux single block linear1
        return list(tensor.split([inner, inner, inner, tensor.shape[0] - 3 * inner], dim=0))
    return list(tensor.chunk(len(names), dim=0))


def _rules(arch: str, blocks: dict[str, int]) -> list[tuple[str, tuple[str, ...], bool]]:
    """(publisher key, our names, swapped) for a model with `blocks` = {publisher block prefix: count}."""
    rules = [(k, v, k.startswith(SWAPPED)) for k, v in TOP[arch].items()]
    for theirs, ours, table in BLOCKS[arch]:
        for i in range(blocks.get(theirs, 0)):
            last = arch == "sd3" and i == blocks[theirs] - 1
            for key, names in table.items():
                swap = last and key.startswith(SD3_LAST_CONTEXT_NORM)
                rules.append((f"{theirs}.{i}.{key}", tuple(f"{ours}.{i}.{n}" for n in names), swap))
    return rules


def count_blocks(keys, prefix: str) -> int:
    """How many `prefix.N.` blocks the keys hold (N + 1 of the highest)."""
    found = {int(m[1]) for k in keys if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def to_ours(state: dict, arch: str, what: str) -> dict:
    """A transformer's tensors in the publisher's names (no prefix) -> diffusers' names; meta tensors will do.

    CheckpointError in one line for a key the layout has no place for."""
    embedder = "img_in.weight" if arch == "flux" else "x_embedder.proj.weight"
    if embedder not in state:
        raise CheckpointError(f"{what}: no {embedder}; not a complete checkpoint of {ARCH_WORDS[arch]}")
    inner = int(state[embedder].shape[0])
    rules = _rules(arch, {p: count_blocks(state, p) for p, _, _ in BLOCKS[arch]})
    out, used = {}, set()
    for key, names, swap in rules:
        if key not in state:
            continue
        used.add(key)
        value = _swap(state[key]) if swap else state[key]
        out.update(zip(names, _split(value, names, inner), strict=True))
    unknown = sorted(set(state) - used)
    if unknown:
        raise CheckpointError(
            f"{what}: {len(unknown)} tensors have no place in {ARCH_WORDS[arch]} (e.g. {unknown[0]}); not a base "
            "checkpoint in the publisher's layout"
        )
    return out


def to_publisher(state: dict, arch: str) -> dict:
    """The inverse of `to_ours`: diffusers' names -> the publisher's (fused tensors joined), exactly."""
    blocks = {theirs: count_blocks(state, ours) for theirs, ours, _ in BLOCKS[arch]}
    out, used = {}, set()
    for key, names, swap in _rules(arch, blocks):
        if not all(n in state for n in names):
            continue
        used.update(names)
        value = torch.cat([state[n] for n in names], dim=0) if len(names) > 1 else state[names[0]]
        out[key] = _swap(value) if swap else value
    left = sorted(set(state) - used)
    if left:
        raise KeyError(f"no publisher name for {left[0]}")
    return out


ARCH_WORDS = {"sd3": "an SD3/SD3.5 (MMDiT) transformer", "flux": "a Flux transformer"}


# ------------------------------------------------------------------------------------------------------------
# LDM VAE names (Stability's first_stage_model.*, BFL's ae.safetensors): the inverse of diffusers' converter
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict, prefix: str = "") -> dict:
    """A diffusers `AutoencoderKL` state dict -> LDM names (diffusers' `convert_ldm_vae_checkpoint` reverses it)."""
    ups = count_blocks(state, "decoder.up_blocks")
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        if m := re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.+)$", new):
            part = "block." if m[2] == "resnets" else "upsample."
            new = f"decoder.up.{ups - 1 - int(m[1])}.{part}{m[3]}"
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", new):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.dim() == 2 and m[2] != "group_norm":
                value = value[:, :, None, None]  # linear -> 1x1 conv
        out[prefix + new] = value
    return out


# ------------------------------------------------------------------------------------------------------------
# configs from shapes
def family_constants(arch: str) -> dict:
    """io/configs/<arch>_file.json: what the files' weights do not say."""
    values = json.loads((CONFIG_DIR / f"{arch}_file.json").read_text())
    return {k: v for k, v in values.items() if not k.startswith("_")}


def _needs_config(what: str, reason: str, flag: str) -> CheckpointError:
    return CheckpointError(
        f"cannot tell the architecture of {what} from its weights ({reason}); pass {flag} FILE (JSON with the "
        'diffusers config fields of "transformer", "vae" or a text encoder)'
    )


def transformer_config(meta: dict, arch: str, what: str, flag: str) -> dict:
    """The diffusers config of an SD3 / Flux transformer from the shapes of its tensors (our names)."""
    if arch == "sd3":
        proj = meta["pos_embed.proj.weight"]  # (inner, latent channels, patch, patch)
        inner, patch = int(proj.shape[0]), int(proj.shape[2])
        norm_q = meta.get("transformer_blocks.0.attn.norm_q.weight")
        head = int(norm_q.shape[0]) if norm_q is not None else SD3_HEAD_DIM
        if inner % head:
            raise _needs_config(what, f"width {inner} is not a whole number of {head}-wide heads", flag)
        layers = count_blocks(meta, "transformer_blocks")
        context = meta["context_embedder.weight"]  # (caption projection, T5 width)
        return {
            "patch_size": patch,
            "in_channels": int(proj.shape[1]),
            "out_channels": int(meta["proj_out.weight"].shape[0]) // (patch * patch),
            "num_layers": layers,
            "attention_head_dim": head,
            "num_attention_heads": inner // head,
            "joint_attention_dim": int(context.shape[1]),
            "caption_projection_dim": int(context.shape[0]),
            "pooled_projection_dim": int(meta["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
            "pos_embed_max_size": math.isqrt(int(meta["pos_embed.pos_embed"].shape[1])),
            "dual_attention_layers": [
                i for i in range(layers) if f"transformer_blocks.{i}.attn2.to_q.weight" in meta
            ],
            "qk_norm": "rms_norm" if norm_q is not None else None,
        }
    image = meta["x_embedder.weight"]  # (inner, packed latent channels)
    inner = int(image.shape[0])
    head = int(meta["transformer_blocks.0.attn.norm_q.weight"].shape[0])
    return {
        "patch_size": 1,
        "in_channels": int(image.shape[1]),
        "out_channels": int(meta["proj_out.weight"].shape[0]),
        "num_layers": count_blocks(meta, "transformer_blocks"),
        "num_single_layers": count_blocks(meta, "single_transformer_blocks"),
        "attention_head_dim": head,
        "num_attention_heads": inner // head,
        "joint_attention_dim": int(meta["context_embedder.weight"].shape[1]),
        "pooled_projection_dim": int(meta["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in meta,
    }


def vae_config(meta: dict) -> dict:
    """An `AutoencoderKL` config from an LDM VAE's shapes (no prefix)."""
    levels = count_blocks(meta, "encoder.down")
    return {
        "in_channels": int(meta["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(meta["decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(meta["decoder.conv_in.weight"].shape[1]),
        "block_out_channels": [
            int(meta[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)
        ],
        "layers_per_block": count_blocks(meta, "encoder.down.0.block"),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "use_quant_conv": "quant_conv.weight" in meta,
        "use_post_quant_conv": "post_quant_conv.weight" in meta,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in meta,
    }


def clip_config(meta: dict, constants: dict) -> dict:
    """A `CLIPTextConfig` from a CLIP text model's shapes (transformers' names, `text_model.` level)."""
    vocab, hidden = meta["text_model.embeddings.token_embedding.weight"].shape
    config = {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(meta["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": count_blocks(meta, "text_model.encoder.layers"),
        "max_position_embeddings": int(meta["text_model.embeddings.position_embedding.weight"].shape[0]),
        "num_attention_heads": int(hidden) // constants.get("head_dim", 64),
    }
    if "text_projection.weight" in meta:
        config["projection_dim"] = int(meta["text_projection.weight"].shape[0])
    return {**config, **{k: v for k, v in constants.items() if k != "head_dim"}}


def t5_config(meta: dict, constants: dict) -> dict:
    """A `T5Config` (encoder) from a T5 encoder's shapes: heads from the relative attention bias table."""
    vocab, width = meta["shared.weight"].shape
    bias = meta["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]  # (buckets, heads)
    heads = int(bias.shape[1])
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in meta
    ff = meta["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]
    return {
        "vocab_size": int(vocab),
        "d_model": int(width),
        "d_kv": int(meta["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]) // heads,
        "d_ff": int(ff.shape[0]),
        "num_layers": count_blocks(meta, "encoder.block"),
        "num_heads": heads,
        "relative_attention_num_buckets": int(bias.shape[0]),
        "feed_forward_proj": "gated-gelu" if gated else "relu",  # T5 v1.1 (SD3, Flux): gated GELU
        "is_encoder_decoder": False,
        "use_cache": False,
        **constants,
    }


# ------------------------------------------------------------------------------------------------------------
# headers
def refuse_gguf(path: Path, flag: str) -> None:
    """One line for a GGUF file (quantised weights): its first 4 bytes, no weights read."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError:
        return
    if magic == GGUF_MAGIC or path.name.lower().endswith(".gguf"):
        raise CheckpointError(
            f"{flag} {path.name}: a GGUF file (quantised weights, as ComfyUI-GGUF and llama.cpp write them), which "
            "we do not read; use the bf16/fp16/fp32 .safetensors release"
        )


def read_header(path: Path, flag: str) -> dict:
    """{key: meta tensor} of a weights file (its header only), with fp8 files refused in one line."""
    refuse_gguf(path, flag)
    with LazyWeights(path) as weights:
        meta = weights.meta
    try:
        refuse_unreadable(meta)
    except CheckpointError as err:
        raise CheckpointError(f"{flag} {path.name}: {err}") from None
    fp8 = Counter(str(v.dtype).replace("torch.", "") for v in meta.values() if v.dtype in FLOAT8)
    if fp8:
        raise CheckpointError(
            f"{flag} {path.name}: {sum(fp8.values())} tensors are fp8 ({', '.join(fp8)}), which we do not read; "
            "use the bf16/fp16/fp32 release"
        )
    return meta


def part(meta: dict, prefix: str) -> dict:
    """The entries under `prefix`, without it."""
    return {k[len(prefix) :]: v for k, v in meta.items() if k.startswith(prefix)}


def transformer_part(meta: dict, arch: str) -> tuple[str, dict]:
    """(prefix, tensors) of the transformer in a base file: Stability's under `model.diffusion_model.`, BFL's bare."""
    if any(k.startswith(MODEL_PREFIX) for k in meta):
        return MODEL_PREFIX, part(meta, MODEL_PREFIX)
    assert arch == "flux", arch
    skip = (VAE_PREFIX, "text_encoders.")
    return "", {k: v for k, v in meta.items() if not k.startswith(skip)}


def weights_dtype(tensors) -> torch.dtype:
    """The floating dtype holding most of the elements (a bf16 file with a few float32 norms is bf16)."""
    counts: Counter = Counter()
    for tensor in tensors:
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


# ------------------------------------------------------------------------------------------------------------
# loading: each part built on the meta device, then given the file's tensors themselves (`load_into_empty`)
def load_transformer(tensors: dict, arch: str, config: dict, dtype: torch.dtype, what: str):
    """diffusers' `SD3Transformer2DModel` / `FluxTransformer2DModel` from a file's tensors in the publisher's names
    (no prefix): the split parts are views, so tensors already in `dtype` are not copied."""
    import diffusers

    from controlnet.io.safe_load import load_into_empty

    cls = diffusers.SD3Transformer2DModel if arch == "sd3" else diffusers.FluxTransformer2DModel
    with torch.device("meta"):
        model = cls(**config)
    return load_into_empty(model, to_ours(tensors, arch, what), what, dtype)


def load_vae(tensors: dict, config: dict, dtype: torch.dtype, what: str):
    """diffusers' `AutoencoderKL` from LDM-named tensors (no prefix), renamed by diffusers' own converter."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from controlnet.io.safe_load import load_into_empty

    with torch.device("meta"):
        model = diffusers.AutoencoderKL(**config)
    return load_into_empty(model, convert_ldm_vae_checkpoint(tensors, config), what, dtype)


def load_text_encoder(tensors: dict, class_name: str, config: dict, dtype: torch.dtype, what: str):
    """A transformers CLIP / T5 text encoder from tensors in transformers' names (no prefix)."""
    import transformers

    from controlnet.io.safe_load import load_into_empty

    cls = getattr(transformers, class_name)
    config_cls = transformers.T5Config if class_name.startswith("T5") else transformers.CLIPTextConfig
    with torch.device("meta"):
        model = cls(config_cls(**config))
    tensors = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
    if "shared.weight" in tensors:  # T5: the input embedding is the shared table (files hold it once)
        tensors.setdefault("encoder.embed_tokens.weight", tensors["shared.weight"])
    own = model.state_dict()
    if (
        class_name == "CLIPTextModel"
        and "text_projection.weight" in tensors
        and "text_projection.weight" not in own
    ):
        tensors.pop("text_projection.weight")  # Flux takes CLIP-L without SD3's projection
    return load_into_empty(model, tensors, what, dtype, optional=("position_ids",))
