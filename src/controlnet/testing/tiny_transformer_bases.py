"""Tiny random SD3 and Flux bases as diffusers folders, built offline, for tests of transformer bases.

diffusers' own pipeline tests download `hf-internal-testing` tokenizers; these are built here instead
(../shared/reference/dit-controlnets.md, "Offline pipelines for tests"): the tiny CLIP BPE of `tiny_models.py` and a
word-level T5 tokenizer from `tokenizers`. Transformers are `tiny_transformers.py`'s (diffusers' test configs with 4
blocks); the VAE is one block (factor 1), so a 32 px image is a 32x32 latent. A 2-step 32 px generation takes well
under a second on a CPU.

The same weights as the single files users have (io/transformer_files.py reads them): `write_sd3_file` writes a tiny
folder's base as one Stability checkpoint (`model.diffusion_model.*`, optionally the VAE as `first_stage_model.*` and
the text encoders as `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`); `write_flux_files` writes BFL's transformer
file (`double_blocks.N`, `single_blocks.N`) and `ae.safetensors`. Both write the base config JSON a tiny architecture
needs (`--base-config`): what no weight says (the VAE's groups, CLIP's heads, Flux's rotary axes) differs from the
real models' values.
"""

from __future__ import annotations

from pathlib import Path

import torch

from controlnet.testing.tiny_models import WORDS, make_text_encoder, make_tokenizer
from controlnet.testing.tiny_transformers import make_flux_transformer, make_sd3_transformer

T5_MAX_TOKENS = 77  # without model_max_length the pipelines' padding call overflows (see the reference)
TEXT_WIDTH = 32  # CLIP hidden/projection and T5 d_model: SD3's joint_attention_dim and Flux's (both tiny configs)


def make_t5_tokenizer(folder: Path):
    """A unigram `T5TokenizerFast` over the tiny vocabulary (plus pad, eos, unk), its file under `folder`.

    Unigram, as T5's own: transformers' `T5Tokenizer.from_pretrained` (what a saved folder names) reads no other model.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        ("\u2581" + w, -1.0) for w in (*WORDS, "photo", "of")
    ]
    core = Tokenizer(models.Unigram(pieces, unk_id=2))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    core.save(str(folder / "tokenizer.json"))
    return T5TokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=T5_MAX_TOKENS,
    )


def make_t5_encoder(vocab_size: int, seed: int):
    """A 1-layer `T5EncoderModel` of width TEXT_WIDTH, in eval mode."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=TEXT_WIDTH,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def make_transformer_vae(latent_channels: int, seed: int, **config):
    """A one-block `AutoencoderKL` (factor 1: images and latents have one size) with `latent_channels`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **config,
    ).eval()


def make_sd3_components(folder: Path, seed: int = 0, t5: bool = True) -> dict:
    """The components of a tiny `StableDiffusion3Pipeline` (tokenizer files written under `folder`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    clip = make_tokenizer(folder / "_clip")
    parts = {
        "transformer": make_sd3_transformer(seed),
        "vae": make_transformer_vae(8, seed + 1, shift_factor=0.0609, scaling_factor=1.5035),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "text_encoder": make_text_encoder(clip, TEXT_WIDTH, seed + 2, projection=TEXT_WIDTH),
        "tokenizer": clip,
        "text_encoder_2": make_text_encoder(clip, TEXT_WIDTH, seed + 3, projection=TEXT_WIDTH),
        "tokenizer_2": clip,
        "text_encoder_3": None,
        "tokenizer_3": None,
    }
    if t5:
        t5_tokenizer = make_t5_tokenizer(folder / "_t5")
        parts.update(text_encoder_3=make_t5_encoder(len(t5_tokenizer), seed + 4), tokenizer_3=t5_tokenizer)
    return parts


def make_flux_components(folder: Path, seed: int = 0) -> dict:
    """The components of a tiny `FluxPipeline` (tokenizer files written under `folder`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    clip = make_tokenizer(folder / "_clip")
    t5_tokenizer = make_t5_tokenizer(folder / "_t5")
    return {
        "transformer": make_flux_transformer(seed),
        "vae": make_transformer_vae(4, seed + 1, shift_factor=0.1159, scaling_factor=0.3611),  # Flux's VAE values
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": make_text_encoder(clip, TEXT_WIDTH, seed + 2),
        "tokenizer": clip,
        "text_encoder_2": make_t5_encoder(len(t5_tokenizer), seed + 3),
        "tokenizer_2": t5_tokenizer,
    }


def write_sd3_base(folder: Path, seed: int = 0, t5: bool = True, dtype: torch.dtype | None = None) -> Path:
    """A tiny SD3 base saved as a diffusers folder (model_index.json names StableDiffusion3Pipeline)."""
    from diffusers import StableDiffusion3Pipeline

    return _save(
        StableDiffusion3Pipeline(**make_sd3_components(Path(folder).parent / "_parts", seed, t5)), folder, dtype
    )


def write_flux_base(folder: Path, seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """A tiny Flux base saved as a diffusers folder (model_index.json names FluxPipeline)."""
    from diffusers import FluxPipeline

    return _save(FluxPipeline(**make_flux_components(Path(folder).parent / "_parts", seed)), folder, dtype)


def _component(folder: Path, name: str, dtype: torch.dtype | None = None):
    """One module of a diffusers folder written above (its class from model_index.json)."""
    import importlib
    import json

    library, class_name = json.loads((Path(folder) / "model_index.json").read_text())[name]
    cls = getattr(importlib.import_module(library), class_name)
    return cls.from_pretrained(str(Path(folder) / name), local_files_only=True).eval()


def _save_file(tensors: dict, path: Path, dtype: torch.dtype | None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    cast = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
        for k, v in tensors.items()
    }
    save_file(cast, str(path))
    return path


def _vae_overrides(vae) -> dict:
    return {k: vae.config[k] for k in ("norm_num_groups", "scaling_factor", "shift_factor", "sample_size")}


def _clip_overrides(encoder) -> dict:
    return {k: getattr(encoder.config, k) for k in ("num_attention_heads", "hidden_act")}


def write_sd3_file(
    folder: Path,
    path: Path,
    encoders: bool = True,
    vae: bool = True,
    prefix: str = "model.diffusion_model.",
    dtype: torch.dtype | None = None,
) -> tuple[Path, Path]:
    """The tiny SD3 base of diffusers folder `folder` as one Stability checkpoint file at `path` (the MMDiT, and the
    VAE and text encoders unless told not to; T5 when the folder has one); returns (file, base config JSON)."""
    import json

    from controlnet.io.transformer_files import SD3_ENCODER_PREFIXES, VAE_PREFIX, to_publisher, vae_to_ldm

    folder, path = Path(folder), Path(path)
    transformer = _component(folder, "transformer")
    tensors = {prefix + k: v for k, v in to_publisher(transformer.state_dict(), "sd3").items()}
    overrides: dict = {"transformer": {"sample_size": transformer.config.sample_size}}
    if vae:
        module = _component(folder, "vae")
        tensors.update(vae_to_ldm(module.state_dict(), VAE_PREFIX))
        overrides["vae"] = _vae_overrides(module)
    index = json.loads((folder / "model_index.json").read_text())
    for name, file_prefix in SD3_ENCODER_PREFIXES.items() if encoders else ():
        if index.get(name, [None])[0] is None:
            continue
        module = _component(folder, name)
        own = module.state_dict()
        tensors.update({file_prefix + k: v for k, v in own.items() if k != "encoder.embed_tokens.weight"})
        if name != "text_encoder_3":
            overrides[name] = _clip_overrides(module)
    _save_file(tensors, path, dtype)
    config = path.with_suffix(".json")
    config.write_text(json.dumps(overrides, indent=2))
    return path, config


def write_flux_files(
    folder: Path, out: Path, prefix: str = "", dtype: torch.dtype | None = None
) -> tuple[Path, Path, Path]:
    """The tiny Flux base of diffusers folder `folder` as BFL's files in `out`: the transformer
    (flux1-tiny.safetensors, under `prefix`) and ae.safetensors; returns (transformer file, VAE file, base config
    JSON). The text encoders stay folders: `folder`/text_encoder (CLIP-L) and text_encoder_2 (T5)."""
    import json

    from controlnet.io.transformer_files import to_publisher, vae_to_ldm

    folder, out = Path(folder), Path(out)
    transformer = _component(folder, "transformer")
    tensors = {prefix + k: v for k, v in to_publisher(transformer.state_dict(), "flux").items()}
    file = _save_file(tensors, out / "flux1-tiny.safetensors", dtype)
    vae = _component(folder, "vae")
    ae = _save_file(vae_to_ldm(vae.state_dict()), out / "ae.safetensors", dtype)
    config = out / "flux1-tiny.json"
    overrides = {
        "transformer": {"axes_dims_rope": list(transformer.config.axes_dims_rope)},
        "vae": _vae_overrides(vae),
    }
    config.write_text(json.dumps(overrides, indent=2))
    return file, ae, config


def _save(pipe, folder: Path, dtype: torch.dtype | None) -> Path:
    if dtype is not None:
        pipe.to(dtype)
    pipe.save_pretrained(str(folder))
    return Path(folder)
