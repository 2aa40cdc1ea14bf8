"""Round trips between the two formats are exact: same keys, same bits, same dtype."""

import json

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file, save_file

from controlnet import ControlNet, load_controlnet, save_controlnet
from controlnet.io.api import controlnet_state_to_original
from controlnet.testing.tiny_models import make_tiny_unet, randomize


def _random_net(family: str, seed: int = 7) -> ControlNet:
    return randomize(ControlNet.from_unet(make_tiny_unet(family)), seed=seed)


def _assert_same(a: dict, b: dict):
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_original_to_ours_to_original_is_bit_exact(family, tmp_path, prefix):
    net = _random_net(family)
    original = controlnet_state_to_original(net.state_dict(), 2, prefix=prefix)
    src = tmp_path / "control_src.safetensors"
    save_file(original, src)
    loaded = load_controlnet(src, unet=make_tiny_unet(family, seed=99))  # unet weights are overwritten
    dst = tmp_path / "control_dst.safetensors"
    save_controlnet(loaded, dst, format="original", prefix=prefix)
    _assert_same(load_file(src), load_file(dst))


def test_half_precision_original_round_trip_keeps_dtype_and_bits(tmp_path):
    net = _random_net("sd15").half()
    src = tmp_path / "control_fp16.safetensors"
    save_file(controlnet_state_to_original(net.state_dict(), 2), src)
    loaded = load_controlnet(src, unet=make_tiny_unet("sd15"))
    dst = tmp_path / "back.safetensors"
    save_controlnet(loaded, dst, format="original", dtype=torch.float16)
    _assert_same(load_file(src), load_file(dst))


def test_pth_and_safetensors_load_identically(tmp_path):
    net = _random_net("sd15")
    original = controlnet_state_to_original(net.state_dict(), 2)
    torch.save({"state_dict": original}, tmp_path / "control.pth")  # Lightning-style wrapper
    save_file(original, tmp_path / "control.safetensors")
    a = load_controlnet(tmp_path / "control.pth", unet=make_tiny_unet("sd15")).state_dict()
    b = load_controlnet(tmp_path / "control.safetensors", unet=make_tiny_unet("sd15")).state_dict()
    _assert_same(a, b)
    _assert_same(a, net.state_dict())


def test_diffusers_to_ours_to_diffusers_is_exact(family, tmp_path):
    template = ControlNet.from_unet(make_tiny_unet(family))
    ref = randomize(ControlNetModel(**template.diffusers_config()), seed=11)
    ref.save_pretrained(tmp_path / "src")
    net = load_controlnet(tmp_path / "src")  # no unet: architecture from the folder's config.json
    save_controlnet(net, tmp_path / "dst", format="diffusers")
    _assert_same(
        load_file(tmp_path / "src/diffusion_pytorch_model.safetensors"),
        load_file(tmp_path / "dst/diffusion_pytorch_model.safetensors"),
    )
    back = ControlNetModel.from_pretrained(tmp_path / "dst")
    src_config = json.loads((tmp_path / "src/config.json").read_text())
    for key, value in json.loads((tmp_path / "dst/config.json").read_text()).items():
        if not key.startswith("_"):
            assert src_config[key] == value, key
    _assert_same(back.state_dict(), ref.state_dict())


def test_pixel_space_controlnet_keeps_its_hint_stride(tmp_path):
    net = ControlNet.from_unet(make_tiny_unet("sd15"), hint_downscale_factor=1)
    save_controlnet(net, tmp_path / "pixel", format="diffusers")
    back = load_controlnet(tmp_path / "pixel")
    assert back.hint_config.downscale_factor == 1
    assert [c.stride[0] for c in back.controlnet_cond_embedding.blocks] == [1] * 6


def test_pixel_space_controlnet_keeps_its_hint_stride_in_original_format(tmp_path):
    net = ControlNet.from_unet(make_tiny_unet("sd15"), hint_downscale_factor=4)
    save_controlnet(net, tmp_path / "latent4.safetensors", format="original")
    back = load_controlnet(tmp_path / "latent4.safetensors", unet=make_tiny_unet("sd15"))
    assert back.hint_config.downscale_factor == 4
    forced = load_controlnet(
        tmp_path / "latent4.safetensors", unet=make_tiny_unet("sd15"), hint_downscale_factor=8
    )
    assert forced.hint_config.downscale_factor == 8
    with pytest.raises(ValueError, match="only a .safetensors file can record"):
        save_controlnet(net, tmp_path / "latent4.pth", format="original")
    assert not (tmp_path / "latent4.pth").exists()


def test_save_refuses_bad_format_and_file_name_for_folder(tmp_path):
    net = _random_net("sd15")
    with pytest.raises(ValueError, match="expected 'diffusers' or 'original'"):
        save_controlnet(net, tmp_path / "x", format="ckpt")
    with pytest.raises(ValueError, match="writes a folder"):
        save_controlnet(net, tmp_path / "x.safetensors", format="diffusers")
    assert list(tmp_path.iterdir()) == []
