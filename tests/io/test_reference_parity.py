"""Parity with the original implementation (lllyasviel/ControlNet) on the reference fixtures in ../shared."""

import json
import lzma

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

from controlnet import ControlNet, load_controlnet, load_unet
from controlnet.io.api import build_unet, controlnet_state_to_original
from controlnet.io.formats import builtin_unet_config

ATOL = 1e-4  # fixtures/cldm/README.md: summation order alone moves results by ~1e-6


@pytest.fixture
def tiny_a(shared_dir, tmp_path):
    folder = shared_dir / "fixtures/cldm/tiny_a"
    raw = lzma.decompress((folder / "weights.safetensors.xz").read_bytes())
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(raw)
    config = json.loads((folder / "diffusers_config.json").read_text())
    return {"weights": weights, "config": config, "io": load_file(folder / "io.safetensors"), "raw": raw}


@torch.no_grad()
def test_forward_reproduces_every_reference_tensor(tiny_a):
    io = tiny_a["io"]
    unet = load_unet(tiny_a["weights"], config=tiny_a["config"]["unet"])
    net = load_controlnet(tiny_a["weights"], unet=unet)
    out = net(io["x"], io["timesteps"], io["context"], io["hint"])
    residuals = out.down + [out.mid]
    names = sorted(k for k in io if k.startswith("control_"))
    assert len(residuals) == len(names) == 5
    for name, got in zip(names, residuals, strict=True):
        torch.testing.assert_close(got, io[name], atol=ATOL, rtol=0, msg=name)
    controlled = unet(
        io["x"],
        io["timesteps"],
        io["context"],
        down_block_additional_residuals=tuple(out.down),
        mid_block_additional_residual=out.mid,
    ).sample
    torch.testing.assert_close(controlled, io["eps_controlled"], atol=ATOL, rtol=0)
    plain = unet(io["x"], io["timesteps"], io["context"]).sample
    torch.testing.assert_close(plain, io["eps_uncontrolled"], atol=ATOL, rtol=0)


def test_xz_compressed_file_loads_directly(tiny_a, shared_dir):
    xz = shared_dir / "fixtures/cldm/tiny_a/weights.safetensors.xz"
    a = load_controlnet(xz, config=tiny_a["config"]["unet"]).state_dict()
    b = load_controlnet(tiny_a["weights"], config=tiny_a["config"]["unet"]).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_key_mapping_equals_diffusers_converter(tiny_a):
    """Our bijective renaming gives exactly the state dict diffusers' single-file converter produces."""
    ours = load_controlnet(tiny_a["weights"], config=tiny_a["config"]["unet"]).state_dict()
    theirs = convert_controlnet_checkpoint(load_bytes(tiny_a["raw"]), tiny_a["config"]["controlnet"])
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(("family", "manifest"), [("sd15", "keys_sd15.json"), ("sd21", "keys_sd21.json")])
def test_from_unet_gives_official_keys_and_shapes(shared_dir, family, manifest):
    """Built on the meta device (no memory), saved in the original layout: the official key list, in order."""
    expected = json.loads((shared_dir / "fixtures/cldm" / manifest).read_text())
    net = ControlNet.from_unet(build_unet(builtin_unet_config(family), device="meta"))
    original = controlnet_state_to_original(net.state_dict(), layers_per_block=2)
    assert list(original) == list(expected)
    assert {k: list(v.shape) for k, v in original.items()} == expected
