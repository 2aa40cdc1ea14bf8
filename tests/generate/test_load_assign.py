"""Single files load into empty (meta) modules that take the file's tensors: exact weights, no meta tensors left,
no second copy (float tensors stay memory-mapped from the file), the same behaviour as modules filled by copying.

The files are tiny random SD1.x single files in the original (LDM) layout, written by controlnet.testing.ldm_files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file

from controlnet.errors import CheckpointError
from controlnet.io.api import load_unet
from controlnet.io.safe_load import map_state_dict
from controlnet.io.single_file import read_single_file
from controlnet.testing.ldm_files import meta_parts, sd15_parts_config, write_sd_file
from controlnet.testing.tiny_models import write_clip_vocab

FLOAT_NOISE = 1e-5  # max |difference| allowed between mapped and copied weights' outputs (see the test)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("assign")
    configs = sd15_parts_config("tiny")
    return {
        "path": write_sd_file(root / "tiny.safetensors", configs, seed=5),
        "half": write_sd_file(root / "tiny_fp16.safetensors", configs, seed=5, dtype=torch.float16),
        "configs": configs,
        "tokenizer": write_clip_vocab(root / "tokenizer"),
    }


def expected_states(path: Path, configs: dict) -> dict:
    """{component: diffusers-named tensors} of the file, by diffusers' converters on a plain (copied) read."""
    state = {k: v.clone() for k, v in load_file(str(path)).items()}
    text = convert_ldm_clip_checkpoint(state, remove_prefix="cond_stage_model.transformer.")
    return {
        "unet": convert_ldm_unet_checkpoint(state, configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(state, configs["vae"]),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in text.items()},
    }


def load(file: dict, which: str = "path", **kwargs) -> dict:
    return read_single_file(file[which], file["tokenizer"], family="sd15", configs=file["configs"], **kwargs)


def file_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps `path` (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path.resolve()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def mapped_fraction(module: torch.nn.Module, path: Path) -> float:
    """Share of `module`'s parameters whose memory lies in a mapping of `path` (1.0: nothing copied)."""
    ranges = file_ranges(path)
    params = list(module.parameters())
    inside = [p for p in params if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]
    return len(inside) / len(params)


def test_loaded_modules_hold_exactly_the_files_tensors_and_no_meta(tiny_file):
    parts = load(tiny_file)
    expected = expected_states(tiny_file["path"], tiny_file["configs"])
    for name, want in expected.items():
        module = parts[name]
        got = module.state_dict()
        assert set(got) - {"embeddings.position_ids"} == set(want), name
        for key, value in want.items():
            assert got[key].dtype == torch.float32 and torch.equal(got[key], value), f"{name}: {key}"
        tensors = [*module.parameters(), *module.buffers()]
        assert not any(t.is_meta for t in tensors), name
        assert not module.training and not any(p.requires_grad for p in module.parameters()), name
    positions = parts["text_encoder"].get_buffer(
        "text_model.embeddings.position_ids"
        if hasattr(parts["text_encoder"], "text_model")
        else "embeddings.position_ids"
    )
    assert torch.equal(positions, torch.arange(positions.shape[-1]).expand_as(positions))


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc to see file mappings")
def test_float32_tensors_are_not_copied_but_mapped_from_the_file(tiny_file):
    parts = load(tiny_file)
    for name in ("unet", "vae", "text_encoder"):
        assert mapped_fraction(parts[name], tiny_file["path"]) == 1.0, name
    # a copy (what filling initialised modules did) is not in the file's mapping: the check can fail
    copied = {k: v.clone() for k, v in parts["unet"].state_dict().items()}
    clone = meta_parts(tiny_file["configs"])["unet"]
    clone.load_state_dict(copied, assign=True)
    assert mapped_fraction(clone, tiny_file["path"]) == 0.0


def test_float16_file_is_cast_once_and_the_vae_stays_float32(tiny_file):
    expected = expected_states(tiny_file["half"], tiny_file["configs"])
    parts = load(tiny_file, "half")  # default: float32
    for name, want in expected.items():
        got = parts[name].state_dict()
        assert all(got[k].dtype == torch.float32 and torch.equal(got[k], v.float()) for k, v in want.items()), name
    half = load(tiny_file, "half", dtype=torch.float16)
    assert next(half["unet"].parameters()).dtype == torch.float16
    assert next(half["vae"].parameters()).dtype == torch.float32  # fp16 VAEs decode badly
    if Path("/proc/self/maps").is_file():
        assert mapped_fraction(half["unet"], tiny_file["half"]) == 1.0  # already fp16: no copy
        assert mapped_fraction(half["vae"], tiny_file["half"]) == 0.0  # cast: copies


def test_loaded_modules_compute_as_modules_filled_by_copying(tiny_file):
    """Same weights, same outputs up to float noise: a mapped tensor sits at the file's offset (safetensors aligns
    data to 4 bytes, not 64), and CPU kernels may sum in another order for unaligned memory (seen: 1.1e-6 on
    UNet outputs of size ~1 in float32). Bound asserted: 1e-5 absolute."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = tiny_file["configs"]
    expected = expected_states(tiny_file["path"], configs)
    parts = load(tiny_file)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**configs["unet"]).eval()
    unet.load_state_dict(expected["unet"])
    vae = AutoencoderKL(**configs["vae"]).eval()
    vae.load_state_dict(expected["vae"])
    text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).eval()
    text.load_state_dict(expected["text_encoder"], strict=False)  # position_ids: the model's own
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 7, configs["unet"]["cross_attention_dim"], generator=generator)
    ids = torch.tensor([[0, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(
            parts["unet"](sample, 10, context).sample, unet(sample, 10, context).sample, rtol=0, atol=FLOAT_NOISE
        )
        torch.testing.assert_close(
            parts["vae"].decode(sample).sample, vae.decode(sample).sample, rtol=0, atol=FLOAT_NOISE
        )
        torch.testing.assert_close(
            parts["text_encoder"](ids).last_hidden_state, text(ids).last_hidden_state, rtol=0, atol=FLOAT_NOISE
        )


def test_load_unet_takes_the_tensors_from_safetensors_and_zip_ckpt(tiny_file, tmp_path):
    want = expected_states(tiny_file["path"], tiny_file["configs"])["unet"]
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_file["path"]))}, ckpt)  # as original .ckpt files wrap it
    assert all(not v.is_meta for v in map_state_dict(ckpt).values())
    for path in (tiny_file["path"], ckpt):
        unet = load_unet(path, config=tiny_file["configs"]["unet"])
        got = unet.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items()), path.name
        assert not any(t.is_meta for t in unet.parameters()) and not unet.training
        if Path("/proc/self/maps").is_file():
            assert mapped_fraction(unet, path) == 1.0, path.name
    half = load_unet(tiny_file["half"], config=tiny_file["configs"]["unet"], dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16


def test_a_wrong_architecture_is_still_refused_with_load_stricts_message(tiny_file):
    configs = dict(tiny_file["configs"], vae=dict(tiny_file["configs"]["vae"], latent_channels=8))
    with pytest.raises(CheckpointError, match=r"VAE in tiny.safetensors does not match.*shape mismatches"):
        read_single_file(tiny_file["path"], tiny_file["tokenizer"], family="sd15", configs=configs)
