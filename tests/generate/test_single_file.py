"""`from_pretrained(<one original checkpoint file>)`: UNet + VAE + CLIP from LDM keys, configs shipped, offline.

The file is built here in the original (LDM) layout from tiny models: the reference implementation's tiny_a UNet
and ControlNet (shared fixtures, already in original keys), a tiny VAE renamed to `first_stage_model.*` and a tiny
CLIP text encoder under `cond_stage_model.transformer.*`.
"""

from __future__ import annotations

import json
import lzma

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from controlnet.generate.pipeline import ControlNetPipeline
from controlnet.io.single_file import detect_family, family_config
from controlnet.testing.ldm_files import vae_to_ldm
from controlnet.testing.tiny_models import (
    MAX_TOKENS,
    condition_image,
    make_text_encoder,
    make_vae,
    write_clip_vocab,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shared_dir):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    fixture = shared_dir / "fixtures" / "cldm" / "tiny_a"
    if not (fixture / "weights.safetensors.xz").is_file():
        pytest.skip("tiny_a fixture not found")
    state = load_safetensors(lzma.decompress((fixture / "weights.safetensors.xz").read_bytes()))
    unet_config = json.loads((fixture / "diffusers_config.json").read_text())["unet"]
    root = tmp_path_factory.mktemp("single")
    tokenizer_dir = write_clip_vocab(root / "tokenizer")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=MAX_TOKENS)
    text_encoder = make_text_encoder(tokenizer, 32, seed=21)
    vae = make_vae(seed=22)
    vae_ldm = vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))
    back = convert_ldm_vae_checkpoint(vae_ldm, dict(vae.config))  # the test's inverse mapping is exact
    assert back.keys() == vae.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in vae.state_dict().items())
    # original files hold transformers-4 names: text_model.embeddings..., as released SD checkpoints do
    clip_ldm = {"cond_stage_model.transformer.text_model." + k: v for k, v in text_encoder.state_dict().items()}
    path = root / "tiny_sd.safetensors"
    save_file({**state, **vae_ldm, **clip_ldm}, str(path))
    text_config = {
        k: v
        for k, v in text_encoder.config.to_dict().items()
        if k in family_config("sd15")["text_encoders"][0]["config"]
    }
    configs = {"unet": unet_config, "vae": dict(vae.config), "text_encoder": text_config}
    return {
        "path": path,
        "tokenizer": tokenizer_dir,
        "configs": configs,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer_obj": tokenizer,
        "state": state,
        "unet_config": unet_config,
    }


def test_single_file_with_its_controlnet_matches_components(checkpoint):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from controlnet.io.api import load_controlnet
    from controlnet.testing.tiny_models import make_scheduler

    c = checkpoint
    pipe = ControlNetPipeline.from_pretrained(
        c["path"], controlnets=[c["path"]], tokenizer=c["tokenizer"], family="sd15", configs=c["configs"]
    )
    assert pipe.base_name == str(c["path"]) and type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    unet = UNet2DConditionModel(**c["unet_config"])
    unet.load_state_dict(convert_ldm_unet_checkpoint(c["state"], c["unet_config"]))
    net = load_controlnet(c["path"], unet=unet)
    ref = ControlNetPipeline(unet.eval(), c["vae"], c["text_encoder"], c["tokenizer_obj"], make_scheduler(), [net])
    cond = condition_image(5)
    a = pipe("a red cat", [cond], steps=2, scheduler="ddim", output_type="np").array
    b = ref("a red cat", [cond], steps=2, scheduler="ddim", output_type="np").array
    assert np.abs(a - b).max() <= 1e-6
    assert np.abs(a - pipe("a red cat", [cond], steps=2, control_scale=0, output_type="np").array).max() > 1e-3


def test_single_file_errors(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="hold no tokenizer"):
        ControlNetPipeline.from_pretrained(checkpoint["path"], family="sd15", configs=checkpoint["configs"])
    with pytest.raises(ValueError, match="cannot tell the base family.*32"):
        ControlNetPipeline.from_pretrained(checkpoint["path"], tokenizer=checkpoint["tokenizer"])
    vae_only = tmp_path / "vae.safetensors"
    save_file({"first_stage_model.x": torch.zeros(1)}, str(vae_only))
    with pytest.raises(ValueError, match="no UNet weights"):
        ControlNetPipeline.from_pretrained(vae_only)


@pytest.mark.parametrize("family,width", [("sd15", 768), ("sd21", 1024), ("sdxl", 2048)])
def test_shipped_configs_build_each_family_on_meta(family, width):
    """The shipped configs describe the real architectures (built on the meta device: no memory, no weights)."""
    import diffusers
    import transformers

    config = family_config(family)
    assert config["unet"]["cross_attention_dim"] == width
    assert (
        detect_family({"model.diffusion_model.x.attn2.to_k.weight": torch.empty(8, width, device="meta")}, "f")
        == family
    )
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**{k: v for k, v in config["vae"].items() if not k.startswith("_")})
        encoders = [
            getattr(transformers, e["class"])(transformers.CLIPTextConfig(**e["config"]))
            for e in config["text_encoders"]
        ]
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    context = sum(e.config.hidden_size for e in encoders)
    assert context == width  # SDXL: 768 (CLIP-L) + 1280 (OpenCLIP bigG) = 2048
    n_params = sum(p.numel() for e in encoders for p in e.parameters())
    expected = {"sd15": 123.06e6, "sd21": 340.39e6, "sdxl": 817.09e6}[
        family
    ]  # CLIP-L; OpenCLIP-H (23 layers); both
    assert abs(n_params - expected) / expected < 0.01, n_params


def test_cli_single_file_error_is_one_line(checkpoint, tmp_path, capsys):
    from controlnet.cli import main

    rc = main(["generate", "a cat", "--base", str(checkpoint["path"]), "--out", str(tmp_path), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot tell the base family" in err[0]
