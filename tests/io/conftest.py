"""Fixtures of the io tests."""

import json
import lzma

import pytest


@pytest.fixture
def combined(shared_dir, tmp_path):
    """The reference's tiny v1.0 combined file (ControlNet + SD, from ../shared/fixtures) and its UNet config."""
    folder = shared_dir / "fixtures/cldm/tiny_a"
    weights = tmp_path / "combined.safetensors"
    weights.write_bytes(lzma.decompress((folder / "weights.safetensors.xz").read_bytes()))
    config = tmp_path / "unet_config.json"
    config.write_text(json.dumps(json.loads((folder / "diffusers_config.json").read_text())["unet"]))
    return weights, config


@pytest.fixture
def unet_config(tmp_path):
    """The tiny SD1.x UNet's diffusers config as a file (`--config`: its family is not recognised from its width)."""
    from controlnet.testing.tiny_models import TINY_UNET_CONFIGS

    path = tmp_path / "unet_config.json"
    path.write_text(json.dumps(TINY_UNET_CONFIGS["sd15"]))
    return path
