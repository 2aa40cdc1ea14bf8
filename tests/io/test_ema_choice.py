"""Files holding EMA weights too (`model_ema.*`, as v1-5-pruned): one choice (`ema=` in `load_unet`, `--ema/--no-ema`
on init and transfer), one line naming the weights used, and never diffusers' advice to pass its `--extract_ema`."""

from __future__ import annotations

import pytest
import torch

from controlnet.cli import main
from controlnet.io.api import load_controlnet, load_unet
from controlnet.testing.ldm_files import EMA_TWIN_OFFSET, write_unet_file
from controlnet.testing.tiny_models import TINY_UNET_CONFIGS

RAW_LINE = "using the raw UNet weights (model.diffusion_model.*), not the EMA ones"
EMA_LINE = "using the EMA UNet weights (model_ema.*)"


def tiny_unet_file(path, ema: bool = False):
    return write_unet_file(path, TINY_UNET_CONFIGS["sd15"], ema=ema)


def said(caplog, capfd) -> str:
    """Our log lines (captured by pytest) and whatever the libraries wrote to stderr themselves (diffusers logs
    through its own handler), since the last call; both emptied."""
    text = caplog.text + capfd.readouterr().err
    caplog.clear()
    return text


@pytest.fixture
def ema_file(tmp_path):
    return tiny_unet_file(tmp_path / "pruned.safetensors", ema=True)


def test_load_unet_chooses_by_its_ema_keyword_and_says_which(ema_file, tmp_path, caplog, capfd):
    config = dict(TINY_UNET_CONFIGS["sd15"])
    ema = load_unet(ema_file, config=config)  # default: the EMA weights, as generation's
    err = said(caplog, capfd)
    assert err.count(EMA_LINE) == 1 and "ema=False for the raw ones" in err and "extract_ema" not in err
    raw = load_unet(ema_file, config=config, ema=False)
    err = said(caplog, capfd)
    assert err.count(RAW_LINE) == 1 and "ema=True for those" in err and "extract_ema" not in err
    a, b = ema.state_dict()["conv_in.weight"], raw.state_dict()["conv_in.weight"]
    torch.testing.assert_close(a, b + EMA_TWIN_OFFSET, rtol=0, atol=1e-6)
    plain = tiny_unet_file(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="ema=True: plain.safetensors holds no EMA UNet weights"):
        load_unet(plain, config=config, ema=True)
    load_unet(plain, config=config)
    assert said(caplog, capfd).strip() == ""  # one UNet in the file: nothing to choose, nothing said


def test_init_and_transfer_take_ema_flags_and_name_the_weights(ema_file, unet_config, tmp_path, caplog, capfd):
    config = ["--config", str(unet_config)]
    assert main(["init", str(ema_file), str(tmp_path / "raw"), *config]) == 0
    err = said(caplog, capfd)
    assert err.count(RAW_LINE) == 1 and "--ema for those" in err and "extract_ema" not in err
    assert main(["init", str(ema_file), str(tmp_path / "ema"), *config, "--ema"]) == 0
    err = said(caplog, capfd)
    assert err.count(EMA_LINE) == 1 and "--no-ema for the raw ones" in err and "extract_ema" not in err
    raw = load_controlnet(tmp_path / "raw").state_dict()["conv_in.weight"]
    ema = load_controlnet(tmp_path / "ema").state_dict()["conv_in.weight"]
    torch.testing.assert_close(ema, raw + EMA_TWIN_OFFSET, rtol=0, atol=1e-6)

    community = tiny_unet_file(tmp_path / "community.safetensors", ema=True)
    args = ["transfer", str(tmp_path / "ema"), str(ema_file), str(community), str(tmp_path / "moved"), *config]
    assert main([*args, "--ema"]) == 0
    err = said(caplog, capfd)
    assert f"pruned.safetensors: {EMA_LINE}" in err and f"community.safetensors: {EMA_LINE}" in err
    assert "extract_ema" not in err
