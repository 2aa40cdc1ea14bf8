"""Transformer (SD3/SD3.5, Flux) ControlNets in every published layout: detected, inspected from the header, loaded
into diffusers' classes, converted with byte-identical tensors; what we cannot read is refused by name in one line.

Each publisher's file is built here from diffusers' classes (the tiny configs of dit-controlnets.md section 2, random
weights) and the publisher's key names, spelled out below independently of `io/transformer_keys.py`.
"""

import json
import struct

import pytest
import torch
from diffusers import FluxControlNetModel, FluxTransformer2DModel, SD3ControlNetModel
from safetensors import safe_open
from safetensors.torch import save_file

from controlnet import load_controlnet
from controlnet.errors import CheckpointError
from controlnet.io import safe_load
from controlnet.io.api import open_controlnet
from controlnet.io.inspect import inspect_path
from controlnet.io.transformer_layouts import (
    convert_transformer_controlnet_file,
    load_transformer_controlnet,
    save_transformer_controlnet,
)
from controlnet.testing.tiny_models import make_tiny_unet
from controlnet.testing.tiny_transformers import TINY_FLUX_CONFIG, TINY_SD3_CONFIG

SD3_TINY = dict(TINY_SD3_CONFIG, num_layers=3)  # diffusers' test config (testing/tiny_transformers.py)
# Stability's SD3.5 nets: single (non-joint) blocks, no pos_embed / context_embedder (diffusers' conversion script)
SD35_STABILITY_TINY = {
    **SD3_TINY,
    "patch_size": 2,
    "joint_attention_dim": None,
    "qk_norm": None,
    "pos_embed_max_size": None,
    "pos_embed_type": None,
    "use_pos_embed": False,
    "force_zeros_for_pooled_projection": False,
}
FLUX_TINY = dict(TINY_FLUX_CONFIG, num_layers=1, num_single_layers=1)
# XLabs: 2 double blocks, no single blocks, guidance embedding (flux-dev), pixel hint packed 2x2 into 16 inputs
XLABS_TINY = {**FLUX_TINY, "patch_size": 2, "num_layers": 2, "num_single_layers": 0, "guidance_embeds": True}
XLABS_TINY["conditioning_embedding_channels"] = 4


def _random(model):
    """Every parameter random (the zero-initialised ones too: a round trip must carry real values)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def tiny(cls, config, seed=0):
    torch.manual_seed(seed)
    return _random(cls(**config))


# --- the publishers' names, written from their code (x-flux ControlNetFlux, Stability's mmditx / ComfyUI) ---
XLABS_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "controlnet_x_embedder": "pos_embed_input",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "input_hint_block.conv_in": "input_hint_block.0",  # nn.Sequential: convs at 0, 2, ..., 14, SiLU between
    "input_hint_block.conv_out": "input_hint_block.14",
    **{f"input_hint_block.blocks.{k}": f"input_hint_block.{2 * k + 2}" for k in range(6)},
}
XLABS_BLOCK = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
XLABS_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}
XLABS_QKV["txt_attn.qkv"] = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
STABILITY_BLOCK = {
    "norm1.linear": "adaLN_modulation.1",
    "attn.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}


def _publisher_state(state, top, block_prefix, block, fused):
    out = {}
    for name, value in state.items():
        module, _, param = name.rpartition(".")
        if module in top:
            out[f"{top[module]}.{param}"] = value
        elif name.startswith("transformer_blocks."):
            _, index, inner = name.split(".", 2)
            inner_module, _, _ = inner.rpartition(".")
            if any(inner_module in parts for parts in fused.values()):
                continue
            if inner_module in block:
                inner = f"{block[inner_module]}.{'scale' if 'norm' in inner_module and 'norm1' not in inner_module else param}"
            out[f"{block_prefix}.{index}.{inner}"] = value
        else:
            out[name] = value
    blocks = {name.split(".")[1] for name in state if name.startswith("transformer_blocks.")}
    for index in blocks:
        for key, parts in fused.items():
            for param in ("weight", "bias"):
                out[f"{block_prefix}.{index}.{key}.{param}"] = torch.cat(
                    [state[f"transformer_blocks.{index}.{p}.{param}"] for p in parts]
                )
    return out


def xlabs_file(path, model):
    save_file(_publisher_state(model.state_dict(), XLABS_TOP, "double_blocks", XLABS_BLOCK, XLABS_QKV), path)
    return path


def stability_file(path, model, control_type=1.0):
    state = _publisher_state(
        model.state_dict(),
        {},
        "transformer_blocks",
        STABILITY_BLOCK,
        {"attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v")},
    )
    save_file({**state, "control_type": torch.tensor(control_type)}, path)
    return path


def file_tensors(path):
    path = path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def assert_same_bytes(a: dict, b: dict):
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].reshape(-1).view(torch.uint8).equal(b[key].reshape(-1).view(torch.uint8)), key


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail on any tensor read: what is checked must come from the header alone."""

    def refuse(self, meta):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(safe_load.LazyWeights, "read", refuse)


# --------------------------------------------------------------------------------------------------------------


def _layouts(tmp_path):
    """(name, path, model, config to pass or None, expected format, family, outputs) for every published layout."""
    sd3 = tiny(SD3ControlNetModel, SD3_TINY)
    sd3.save_pretrained(tmp_path / "sd3-diffusers")
    flux = tiny(FluxControlNetModel, {**FLUX_TINY, "num_mode": 7}, seed=1)
    flux.save_pretrained(tmp_path / "flux-diffusers")
    save_file(sd3.state_dict(), tmp_path / "instantx-sd3.safetensors")  # a single file in diffusers names
    save_file(flux.state_dict(), tmp_path / "shakker-flux-union.safetensors")
    xlabs = tiny(FluxControlNetModel, XLABS_TINY, seed=2)
    stability = tiny(SD3ControlNetModel, SD35_STABILITY_TINY, seed=3)
    return [
        ("diffusers-sd3", tmp_path / "sd3-diffusers", sd3, None, "diffusers-sd3-controlnet", "sd3", 3),
        ("diffusers-flux", tmp_path / "flux-diffusers", flux, None, "diffusers-flux-controlnet", "flux", 2),
        ("instantx", tmp_path / "instantx-sd3.safetensors", sd3, None, "diffusers-sd3-controlnet", "sd3", 3),
        (
            "shakker",
            tmp_path / "shakker-flux-union.safetensors",
            flux,
            dict(flux.config),
            "diffusers-flux-controlnet",
            "flux",
            2,
        ),
        (
            "xlabs",
            xlabs_file(tmp_path / "xlabs.safetensors", xlabs),
            xlabs,
            dict(xlabs.config),
            "xlabs-flux-controlnet",
            "flux",
            2,
        ),
        (
            "stability",
            stability_file(tmp_path / "sd35.safetensors", stability),
            stability,
            dict(stability.config),
            "stability-sd35-controlnet",
            "sd3",
            3,
        ),
    ]


def test_each_layout_is_detected_and_inspected_from_the_header(tmp_path, no_tensor_reads):
    for name, path, model, _, fmt, family, outputs in _layouts(tmp_path):
        found = inspect_path(path)
        assert (found.format, found.family, found.num_control_outputs) == (fmt, family, outputs), name
        assert found.num_parameters == sum(p.numel() for p in model.parameters()), name
        lines = found.describe()
        assert lines["base family"].startswith({"sd3": "Stable Diffusion 3", "flux": "Flux"}[family]), name
        assert "layout" in lines, name
    assert "repeated" in inspect_path(tmp_path / "xlabs.safetensors").describe()["control outputs"]


def test_every_layout_loads_into_diffusers_class_and_round_trips_exactly(tmp_path):
    for name, path, model, config, fmt, _family, _ in _layouts(tmp_path):
        net = load_transformer_controlnet(path, config=config)
        assert type(net) is type(model), name
        assert_same_bytes(net.state_dict(), model.state_dict())
        folder = tmp_path / f"{name}-as-diffusers"
        convert_transformer_controlnet_file(path, folder, "diffusers", config=config)
        assert_same_bytes(file_tensors(folder), model.state_dict())  # diffusers' own names, the same bytes
        publisher = {"xlabs": "xlabs", "stability": "stability"}.get(name, "diffusers-file")
        back = tmp_path / f"{name}-back.safetensors"
        convert_transformer_controlnet_file(folder, back, publisher)  # the folder's config.json: no config needed
        expected = file_tensors(path)
        assert_same_bytes(file_tensors(back), expected)
        assert inspect_path(back).format == fmt


def test_save_writes_every_layout_a_model_fits(tmp_path):
    xlabs = tiny(FluxControlNetModel, XLABS_TINY)
    save_transformer_controlnet(xlabs, tmp_path / "x.safetensors", "xlabs")
    reference = xlabs_file(tmp_path / "reference.safetensors", xlabs)
    assert_same_bytes(file_tensors(tmp_path / "x.safetensors"), file_tensors(reference))
    assert_same_bytes(load_transformer_controlnet(tmp_path / "x.safetensors").state_dict(), xlabs.state_dict())
    union = tiny(FluxControlNetModel, {**FLUX_TINY, "num_mode": 3})
    with pytest.raises(ValueError, match="xlabs layout has no place for this ControlNet's"):
        save_transformer_controlnet(union, tmp_path / "u.safetensors", "xlabs")  # single blocks, mode embedding
    with pytest.raises(ValueError, match="holds Stable Diffusion 3"):
        save_transformer_controlnet(union, tmp_path / "u.safetensors", "stability")
    assert not (tmp_path / "u.safetensors").exists()


def test_stability_control_type_survives_the_diffusers_folder(tmp_path):
    model = tiny(SD3ControlNetModel, SD35_STABILITY_TINY)
    src = stability_file(tmp_path / "sd35_depth.safetensors", model, control_type=2.0)
    net = load_transformer_controlnet(src, config=dict(model.config))
    assert net.config["stability_control_type"]["value"] == 2.0
    save_transformer_controlnet(net, tmp_path / "folder")
    assert json.loads((tmp_path / "folder/config.json").read_text())["stability_control_type"]["value"] == 2.0
    convert_transformer_controlnet_file(tmp_path / "folder", tmp_path / "back.safetensors", "stability")
    assert_same_bytes(file_tensors(tmp_path / "back.safetensors"), file_tensors(src))


def test_a_file_that_cannot_tell_its_config_asks_for_it_in_one_line(tmp_path, no_tensor_reads):
    model = tiny(SD3ControlNetModel, SD35_STABILITY_TINY)
    src = stability_file(tmp_path / "sd35.safetensors", model)
    with pytest.raises(CheckpointError, match="pass the ControlNet's diffusers config.json") as err:
        load_transformer_controlnet(src)  # 32 wide: not a whole number of SD3's 64-wide heads
    assert "\n" not in str(err.value)


# --- refusals: one line, naming what was expected, before any tensor is read ---


def _refused(path, match, loader=load_controlnet, expected="expected"):
    with pytest.raises(CheckpointError, match=match) as err:
        loader(path)
    message = str(err.value)
    assert "\n" not in message and expected in message, message
    return message


def test_gguf_is_refused_by_name(tmp_path, no_tensor_reads):
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 0)  # magic, version 3, no tensors, no metadata
    for name in ("flux-controlnet-Q4_K_S.gguf", "renamed.safetensors"):
        (tmp_path / name).write_bytes(header)
        message = _refused(tmp_path / name, "GGUF")
        assert ".safetensors" in message
        with pytest.raises(CheckpointError, match="GGUF"):
            inspect_path(tmp_path / name)


def test_fp8_scaled_file_is_refused_by_name(tmp_path, no_tensor_reads):
    weight = torch.zeros(4, 4).to(torch.float8_e4m3fn)
    state = {
        "controlnet_blocks.0.weight": weight,
        "controlnet_blocks.0.scale_weight": torch.ones(1),
        "scaled_fp8": torch.zeros(0).to(torch.float8_e4m3fn),
    }
    save_file(state, tmp_path / "cn_fp8_scaled.safetensors")
    _refused(tmp_path / "cn_fp8_scaled.safetensors", "fp8 'scaled'")
    with pytest.raises(CheckpointError, match="fp8 'scaled'"):
        inspect_path(tmp_path / "cn_fp8_scaled.safetensors")


def test_flux_tools_channel_concat_models_are_refused_by_name(tmp_path, no_tensor_reads):
    torch.manual_seed(0)
    tools = FluxTransformer2DModel(
        **{**FLUX_TINY, "in_channels": 8, "out_channels": 4, "axes_dims_rope": [4, 4, 8]}
    )
    save_file(tools.state_dict(), tmp_path / "flux1-canny-dev.safetensors")  # x_embedder 2x proj_out's width
    _refused(tmp_path / "flux1-canny-dev.safetensors", "Flux Tools channel-concat model")
    lora = {
        "x_embedder.weight": torch.zeros(32, 128),
        "transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
    }
    save_file(lora, tmp_path / "flux1-canny-dev-lora.safetensors")
    _refused(tmp_path / "flux1-canny-dev-lora.safetensors", "Flux Tools channel-concat Control LoRA")


def test_fun_vace_controlnets_are_refused_by_name(tmp_path, no_tensor_reads):
    state = {
        "control_img_in.weight": torch.zeros(8, 4),
        "control_blocks.0.before_proj.weight": torch.zeros(8, 8),
        "control_blocks.0.after_proj.weight": torch.zeros(8, 8),
    }
    save_file(state, tmp_path / "Qwen-Image-Fun-Controlnet-Union.safetensors")
    _refused(tmp_path / "Qwen-Image-Fun-Controlnet-Union.safetensors", "Fun/VACE")


def test_families_are_refused_both_ways_from_the_header(tmp_path, no_tensor_reads):
    flux = tiny(FluxControlNetModel, FLUX_TINY)
    flux.save_pretrained(tmp_path / "flux")
    unet = make_tiny_unet("sd15")
    _refused(
        tmp_path / "flux", "is a ControlNet for Flux", lambda p: load_controlnet(p, unet=unet), "the UNet given is"
    )
    with pytest.raises(CheckpointError, match="is a ControlNet for Flux.*a UNet ControlNet .* is expected"):
        open_controlnet(tmp_path / "flux")  # convert/transfer's UNet path
    sd3_base = dict(SD3_TINY, _class_name="SD3Transformer2DModel")
    with pytest.raises(CheckpointError, match="ControlNet for Flux, but the base given is Stable Diffusion 3"):
        load_transformer_controlnet(tmp_path / "flux", base=sd3_base)


def test_a_unet_controlnet_where_a_transformer_one_is_expected_is_refused_by_family(tmp_path, no_tensor_reads):
    from controlnet import ControlNet, save_controlnet

    save_controlnet(ControlNet.from_unet(make_tiny_unet("sd15")), tmp_path / "unet-cn")
    with pytest.raises(
        CheckpointError, match="UNet ControlNet .* but a transformer ControlNet is expected"
    ) as err:
        load_transformer_controlnet(tmp_path / "unet-cn")
    assert "\n" not in str(err.value)
    flux_base = dict(FLUX_TINY, _class_name="FluxTransformer2DModel")
    with pytest.raises(CheckpointError, match="but the base given is Flux"):
        load_transformer_controlnet(tmp_path / "unet-cn", base=flux_base)


# --- the command line, as a user runs it ---


@pytest.mark.slow  # the default suite's 15-minute budget (25-38 s of subprocesses); run with -m slow
def test_cli_inspects_converts_and_refuses(tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "controlnet.cli", *map(str, args)], capture_output=True, text=True, timeout=300
        )

    model = tiny(FluxControlNetModel, XLABS_TINY)
    src = xlabs_file(tmp_path / "flux-canny-controlnet-v3.safetensors", model)
    (tmp_path / "config.json").write_text(json.dumps(dict(model.config)))
    out = run("inspect", src)
    assert out.returncode == 0, out.stderr
    for text in (
        "xlabs-flux-controlnet",
        "XLabs",
        "Flux",
        f"{sum(p.numel() for p in model.parameters()):,}",
        "2 (",
    ):
        assert text in out.stdout, out.stdout
    out = run("convert", src, tmp_path / "folder", "--to", "diffusers", "--config", tmp_path / "config.json")
    assert out.returncode == 0, out.stderr
    assert "wrote diffusers flux ControlNet (2 control outputs)" in out.stdout
    out = run("convert", tmp_path / "folder", tmp_path / "back.safetensors", "--to", "xlabs")
    assert out.returncode == 0, out.stderr
    assert_same_bytes(file_tensors(tmp_path / "back.safetensors"), file_tensors(src))
    out = run("convert", tmp_path / "folder", tmp_path / "x.safetensors", "--to", "original", "--dtype", "bf16")
    assert out.returncode != 0 and "original (cldm) format is the UNet ControlNets'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.safetensors").exists()
