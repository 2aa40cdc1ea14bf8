"""`controlnet init` from SD3 and Flux base folders: the same network as `from_transformer` on the loaded base, in the
base's dtype, in every layout the family has; the options of the other kind of base refused in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3ControlNetModel, SD3Transformer2DModel

from controlnet.cli import main
from controlnet.io.transformer_layouts import load_transformer_controlnet
from controlnet.model.transformer_controlnet import FluxControlNet, SD3ControlNet
from controlnet.testing.tiny_models import make_tiny_unet
from controlnet.testing.tiny_transformer_bases import write_flux_base, write_sd3_base


@pytest.fixture(scope="module")
def sd3_base(tmp_path_factory):
    return write_sd3_base(tmp_path_factory.mktemp("sd3") / "base", t5=False)


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    return write_flux_base(tmp_path_factory.mktemp("flux") / "base", dtype=torch.bfloat16)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_init_from_an_sd3_folder_is_from_transformer_of_the_loaded_base(sd3_base, tmp_path):
    """A real subprocess, as a user runs it; the expected net is built by the model class from the base diffusers
    loads itself."""
    out = tmp_path / "net"
    cmd = [sys.executable, "-m", "controlnet.cli", "init", str(sd3_base), str(out), "--num-layers", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "sd3 ControlNet" in result.stdout and "2 control outputs" in result.stdout
    written = SD3ControlNetModel.from_pretrained(out)
    base = SD3Transformer2DModel.from_pretrained(sd3_base / "transformer")
    expected = SD3ControlNet.from_transformer(base, num_layers=2)
    assert_same_state(written, expected)


def test_init_from_a_bf16_flux_folder_keeps_bf16_and_writes_each_layout(flux_base, tmp_path):
    base = FluxTransformer2DModel.from_pretrained(flux_base / "transformer", torch_dtype=torch.bfloat16)
    expected = FluxControlNet.from_transformer(base, num_layers=2, num_single_layers=1)
    out = tmp_path / "net.safetensors"
    args = [
        "init",
        str(flux_base),
        str(out),
        "--to",
        "diffusers-file",
        "--num-layers",
        "2",
        "--num-single-layers",
        "1",
    ]
    assert main(args) == 0
    net = load_transformer_controlnet(out)
    assert next(net.parameters()).dtype == torch.bfloat16
    assert_same_state(net, expected)

    # XLabs: the hint encoder's random layers come from the seed: the same seed writes the same file
    torch.manual_seed(5)
    expected = FluxControlNet.from_transformer(base, num_layers=2, pixel_hint=True)
    args = [
        "init",
        str(flux_base),
        str(tmp_path / "x.safetensors"),
        "--to",
        "xlabs",
        "--pixel-hint",
        "--num-layers",
    ]
    assert main([*args, "2", "--seed", "5"]) == 0
    assert_same_state(load_transformer_controlnet(tmp_path / "x.safetensors"), expected)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-single-layers", "1"], "--num-single-layers: not an option of a sd3 ControlNet"),
        (["--to", "original", "--num-layers", "1"], "--to original is the UNet ControlNets' format"),
        (["--cond-channels", "1"], "--cond-channels: sd3 ControlNets take the condition as VAE latents"),
        (["--no-ema"], "holds no EMA weights"),
        (["--num-layers", "9"], "num_layers must be an integer in 1..3"),
    ],
)
def test_init_refuses_what_an_sd3_base_cannot_take_in_one_line(sd3_base, tmp_path, capsys, extra, message):
    out = tmp_path / ("net.safetensors" if "original" in extra else "net")
    assert main(["init", str(sd3_base), str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_init_refuses_transformer_options_for_a_unet_base(tmp_path, capsys):
    unet = tmp_path / "unet"
    make_tiny_unet("sd15").save_pretrained(unet)
    for extra, message in (
        (["--num-layers", "2"], "--num-layers: an option of SD3/SD3.5 and Flux bases"),
        (["--to", "xlabs"], "--to xlabs is a layout of SD3/SD3.5 and Flux ControlNets"),
    ):
        out = tmp_path / ("net.safetensors" if "xlabs" in extra else "net")
        assert main(["init", str(unet), str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
