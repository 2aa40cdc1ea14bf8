"""`controlnet demo` mechanics on a tiny random built-in-style base: data, training, report, reproduction."""

from __future__ import annotations

import json

import pytest
import torch

from controlnet import cli
from controlnet.train.demo import DemoConfig, reproduce, run_demo


@pytest.fixture(scope="module")
def builtin_style_base(tmp_path_factory):
    """A random base in the built-in model's folder layout (latent, 16 px images, 8 px latents)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from controlnet.builtin.base import BaseModelConfig, save_builtin_base, unet_kwargs, vae_kwargs
    from controlnet.builtin.text import TextEncoderConfig, build_text_encoder, build_tokenizer
    from controlnet.world.fill import FILL_VOCABULARY

    text = TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_length=8)
    config = BaseModelConfig(
        image_size=16, vae_channels=(8, 16), unet_channels=(8, 16), unet_attention_levels=(1,), text=text
    )
    tokenizer = build_tokenizer(FILL_VOCABULARY, text.max_length)
    torch.manual_seed(0)
    parts = {
        "unet": UNet2DConditionModel(**unet_kwargs(config)),
        "vae": AutoencoderKL(**vae_kwargs(config)),
        "text_encoder": build_text_encoder(text, tokenizer),
        "tokenizer": tokenizer,
    }
    folder = tmp_path_factory.mktemp("base") / "builtin-style"
    save_builtin_base(parts, config, folder)
    return folder


def test_demo_trains_reports_and_its_controlnet_reproduces_the_final_fidelity(builtin_style_base, tmp_path):
    demo = DemoConfig(
        out=str(tmp_path / "demo"),
        base=str(builtin_style_base),
        samples=40,
        minutes=0.01,
        batch_size=4,
        validate_every=1,
        validation_samples=4,
        sampler_steps=2,
        threads=1,
    )
    summary = run_demo(demo, log=lambda *a: None)
    assert summary.status == "time_limit" and summary.step >= 1
    assert summary.floor is not None and summary.ceiling > 0.9
    run = tmp_path / "demo" / "run"
    assert (run / "report.html").is_file() and (run / "final" / "controlnet" / "config.json").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["hint_channels"] == [4, 8, 16] and config["data"]["resolution"] == 16
    recorded, again = reproduce(run)  # re-loaded from disk through the pipeline
    assert recorded == pytest.approx(again, abs=1e-6)
    assert summary.validation[-1] == (summary.step, recorded)
    again = run_demo(demo, log=lambda *a: None)  # its time is used up: it trains no further, only reports
    assert again.status == "time_limit" and again.step == summary.step


def test_demo_without_a_shipped_base_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["demo", "--base", str(tmp_path), "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert "no base_config.json" in capsys.readouterr().err
