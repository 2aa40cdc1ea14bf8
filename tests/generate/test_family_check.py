"""A ControlNet of another base family (an SDXL ControlNet on an SD1.5 base, or the reverse) is refused from the
files' headers, in one line naming both families, before any weights are read: by `generate`, by the pipeline's
loader and by the library's `load_controlnet(path, unet=...)` (a fp16 base is not cast to float32 first)."""

from __future__ import annotations

import time

import pytest
import torch

from controlnet.cli import main
from controlnet.errors import CheckpointError
from controlnet.io.api import load_controlnet
from controlnet.testing.ldm_files import write_controlnet_file, write_unet_file
from controlnet.testing.tiny_models import TINY_UNET_CONFIGS, condition_image, make_tiny_unet, write_clip_vocab

# the tiny UNets at the real families' context widths (768: CLIP ViT-L for SD1.x; 2048: SDXL's two encoders)
SD15 = dict(TINY_UNET_CONFIGS["sd15"], cross_attention_dim=768)
SDXL = dict(TINY_UNET_CONFIGS["sdxl"], cross_attention_dim=2048)
WRONG = "a ControlNet works only with a base of the family it was trained on"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {
        "sd15_base": write_unet_file(root / "v1-5-fp16.safetensors", SD15, dtype=torch.float16),
        "sdxl_base": write_unet_file(root / "sdxl-base.safetensors", SDXL),
        "sd15_net": write_controlnet_file(root / "control_sd15.safetensors", SD15),
        "sdxl_net": write_controlnet_file(root / "control_sdxl.safetensors", SDXL),
        "tokenizer": write_clip_vocab(root / "tokenizer"),
        "cond": _cond(root / "cond.png"),
    }


def _cond(path):
    condition_image(1).save(path)
    return path


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a base fails the test: the refusal must come first."""
    import controlnet.generate.base as base

    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded before the family check")

    monkeypatch.setattr(base, "load_base", refuse)


@pytest.mark.parametrize(
    "base,net,families",
    [
        ("sd15_base", "sdxl_net", ("Stable Diffusion XL", "Stable Diffusion 1.x")),
        ("sdxl_base", "sd15_net", ("Stable Diffusion 1.x", "Stable Diffusion XL")),
    ],
)
def test_generate_refuses_a_controlnet_of_another_family_from_the_headers(
    files, tmp_path, capsys, no_loading, base, net, families
):
    args = ["generate", "a cat", "--base", str(files[base]), "--tokenizer", str(files["tokenizer"])]
    args += ["--controlnet", str(files[net]), "--cond", str(files["cond"]), "--out", str(tmp_path)]
    started = time.perf_counter()
    assert main(args) == 2
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    control, base_family = families
    assert (
        f"ControlNet {files[net].name} is a ControlNet for {control}, but base {files[base].name} is {base_family}"
        in err[0]
    )
    assert WRONG in err[0]
    assert elapsed < 2.0, f"refused after {elapsed:.1f} s"
    assert list(tmp_path.iterdir()) == []


def test_load_controlnet_refuses_another_family_in_one_line(files):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**SD15)
    with pytest.raises(CheckpointError) as err:
        load_controlnet(files["sdxl_net"], unet=sd15)
    assert str(err.value) == (
        f"control_sdxl.safetensors is a ControlNet for Stable Diffusion XL, but the UNet given is Stable Diffusion "
        f"1.x: {WRONG}"
    )
    # the tiny stand-ins share one context width: the SDXL-style added embedding still tells them apart
    tiny_sdxl_net = write_controlnet_file(
        files["sdxl_net"].parent / "tiny_sdxl.safetensors", TINY_UNET_CONFIGS["sdxl"]
    )
    with pytest.raises(
        CheckpointError, match="custom SDXL-style model .* but the UNet given is a custom SD1.x/2.x"
    ):
        load_controlnet(tiny_sdxl_net, unet=make_tiny_unet("sd15"))
    assert load_controlnet(files["sd15_net"], unet=sd15.to_empty(device="cpu")).num_control_outputs > 0
