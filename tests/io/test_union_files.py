"""Union ControlNet files (xinsir's Union/ProMax: diffusers names plus the fusion front end): read, inspected,
written and converted exactly; the original (cldm) format refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import ControlNetUnionModel
from safetensors.torch import load_file, save_file

from controlnet import load_controlnet, save_controlnet
from controlnet.cli import main
from controlnet.io.inspect import inspect_path
from controlnet.model.union_controlnet import UnionControlNet
from controlnet.testing.tiny_models import TINY_UNET_CONFIGS, make_tiny_unet, randomize, tiny_inputs


@pytest.fixture(scope="module")
def promax(tmp_path_factory):
    """A ProMax-shaped (8 types) union net for the tiny SDXL UNet, written by diffusers' own class: (folder, model)."""
    torch.manual_seed(0)
    ours = UnionControlNet.from_unet(make_tiny_unet("sdxl"), num_control_type=8, num_trans_head=4)
    theirs = randomize(ControlNetUnionModel(**{**ours.diffusers_config(), "num_trans_head": 4}), 7).eval()
    folder = tmp_path_factory.mktemp("union") / "controlnet-union-promax"
    theirs.save_pretrained(folder)
    return folder, theirs


def _same_residuals(net, theirs) -> bool:
    x = tiny_inputs("sdxl", batch=1)
    vector = torch.zeros(1, 8)
    vector[:, [1, 3]] = 1
    conds = [x["cond"], torch.rand_like(x["cond"])]
    args = (x["sample"], x["timestep"], x["encoder_hidden_states"])
    with torch.no_grad():
        out = net(
            *args,
            conds=conds,
            types=[1, 3],
            conditioning_scale=[0.6, 0.9],
            added_cond_kwargs=x["added_cond_kwargs"],
        )
        down, mid = theirs(
            *args,
            controlnet_cond=conds,
            control_type=vector,
            control_type_idx=[1, 3],
            conditioning_scale=[0.6, 0.9],
            added_cond_kwargs=x["added_cond_kwargs"],
            return_dict=False,
        )
    # The weights are the file's bytes (checked bitwise by the caller); the residuals agree to float32 rounding only:
    # a memory-mapped tensor is not 64-byte aligned, and oneDNN then takes other kernels (cloning the weights into
    # ordinary memory gives torch.equal; tests/model/test_union_controlnet.py asserts that arithmetic exactly).
    for a, b in zip([*out.down, out.mid], [*down, mid], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return True


def _same_weights(net, theirs) -> bool:
    mine, other = net.state_dict(), theirs.state_dict()
    return set(mine) == set(other) and all(torch.equal(mine[k], other[k]) for k in mine)


def test_a_diffusers_union_folder_loads_as_a_union_net_with_diffusers_residuals(promax):
    folder, theirs = promax
    net = load_controlnet(folder).eval()
    assert isinstance(net, UnionControlNet) and net.union_config.num_control_type == 8
    assert net.union_config.num_trans_head == 4  # from the folder's config.json
    assert _same_weights(net, theirs) and _same_residuals(net, theirs)


def test_a_single_file_in_diffusers_names_loads_with_its_unet(promax, tmp_path):
    """xinsir's `diffusion_pytorch_model_promax.safetensors`, as users rename and drop it into a models folder."""
    folder, theirs = promax
    file = tmp_path / "xinsir-union-promax.safetensors"
    file.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    net = load_controlnet(file, config={**TINY_UNET_CONFIGS["sdxl"]})
    assert isinstance(net, UnionControlNet) and net.union_config.num_trans_layer == 1
    assert net.union_config.num_trans_head == 8  # not in the weights: a file alone takes xinsir's 8
    described = inspect_path(file).describe()
    assert described["union types"].startswith(
        "8: openpose/pose 0, depth 1, hed/pidi/scribble/ted/softedge/soft_edge 2"
    )
    assert described["union types"].endswith("tile 6, repaint/inpaint 7")


def test_save_and_convert_are_exact_and_original_is_refused(promax, tmp_path, capsys):
    folder, _ = promax
    net = load_controlnet(folder)
    out = save_controlnet(net, tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "ControlNetUnionModel" and config["num_control_type"] == 8
    again = ControlNetUnionModel.from_pretrained(out)  # diffusers reads what we write
    assert again.config.num_trans_head == 4
    source = load_file(folder / "diffusion_pytorch_model.safetensors")
    written = load_file(out / "diffusion_pytorch_model.safetensors")
    assert set(source) == set(written) and all(torch.equal(source[k], written[k]) for k in source)

    assert main(["convert", str(folder), str(tmp_path / "converted"), "--to", "diffusers"]) == 0
    converted = load_file(tmp_path / "converted" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(source[k], converted[k]) for k in source) and set(source) == set(converted)

    assert main(["convert", str(folder), str(tmp_path / "o.safetensors"), "--to", "original"]) == 2
    err = capsys.readouterr().err.strip()
    assert "a union ControlNet has no original (cldm) format" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_a_union_net_of_another_family_is_refused_from_the_header(promax, tmp_path):
    folder, _ = promax
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    file = tmp_path / "union.safetensors"
    save_file(state, file)
    with pytest.raises(Exception, match="ControlNet for .* but the UNet given is"):
        load_controlnet(file, unet=make_tiny_unet("sd21"))


def test_inspect_names_a_flux_union_nets_modes(tmp_path):
    """InstantX/Shakker Flux union nets: `FluxControlNetModel(num_mode=...)`; their modes by the model cards' names."""
    from diffusers import FluxControlNetModel

    from controlnet.testing.tiny_transformers import TINY_FLUX_CONFIG

    FluxControlNetModel(**{**TINY_FLUX_CONFIG, "num_mode": 7}).save_pretrained(tmp_path / "flux-union")
    described = inspect_path(tmp_path / "flux-union").describe()
    assert (
        described["union types"]
        == "7: canny 0, tile 1, depth 2, blur 3, pose/openpose 4, gray 5, lq/low_quality 6"
    )
    FluxControlNetModel(**TINY_FLUX_CONFIG).save_pretrained(tmp_path / "flux-plain")
    assert "union types" not in inspect_path(tmp_path / "flux-plain").describe()
