"""The pretraining recipe: a resumed run ends with exactly the weights of an uninterrupted one; checkpoints are atomic."""

from __future__ import annotations

import json

import pytest
import torch

from controlnet.builtin.base import BaseModelConfig, load_builtin_base, sample
from controlnet.builtin.pretrain import (
    CHECKPOINT_NAME,
    LatentPool,
    PretrainConfig,
    export_builtin,
    latent_batch,
    lr_factor,
    pretrain,
    training_batch,
)
from controlnet.builtin.text import TextEncoderConfig

TINY_MODEL = dict(
    image_size=32,
    vae_channels=(8, 8),
    unet_channels=(8, 16),
    unet_attention_levels=(1,),
    head_dim=8,
    norm_groups=4,
    text=TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16, max_length=24),
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when the CPU is shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(out, steps: int, **overrides) -> PretrainConfig:
    fields = dict(
        out=str(out),
        steps=steps,
        vae_steps=1,
        batch_size=2,
        warmup_steps=1,
        scene_fraction=0.5,
        scene_pool=2,
        fill_pool=8,
        model=BaseModelConfig(**TINY_MODEL),
    )
    fields.update(overrides)
    return PretrainConfig(**fields)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = pretrain(tiny_config(tmp_path / "straight", steps=2, vae_steps=2))
    pretrain(tiny_config(tmp_path / "split", steps=2, vae_steps=2), stop_after=1)  # killed inside the VAE stage
    pretrain(
        tiny_config(tmp_path / "split", steps=2, vae_steps=2), resume=True, stop_after=2
    )  # ... and the UNet's
    resumed = pretrain(tiny_config(tmp_path / "split", steps=2, vae_steps=2), resume=True)
    assert straight.step == resumed.step == 2 and resumed.stage == "done"
    for name in ("unet", "ema_unet", "text_encoder", "vae"):
        a, b = getattr(straight, name).state_dict(), getattr(resumed, name).state_dict()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}.{key}")
    lines = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert all("stage" in line for line in lines)


def test_existing_run_needs_resume(tmp_path):
    pretrain(tiny_config(tmp_path, steps=1), stop_after=0)  # writes the initial checkpoint only
    with pytest.raises(ValueError, match="--resume"):
        pretrain(tiny_config(tmp_path, steps=1))


def test_no_temporary_files_left_and_export_loads(tmp_path):
    pretrain(tiny_config(tmp_path / "run", steps=2))
    assert sorted(p.name for p in (tmp_path / "run").glob(f"*{CHECKPOINT_NAME}*")) == [CHECKPOINT_NAME]
    facts = export_builtin(tmp_path / "run", tmp_path / "model")
    assert facts["stage"] == "done" and facts["unet_step"] == 2
    base = load_builtin_base(tmp_path / "model")
    images = sample(base, ["red ball on a blue background", ""], steps=2, seed=0)
    assert len(images) == 2 and images[0].shape == (32, 32, 3) and images[0].dtype.name == "uint8"


def test_training_batch_is_a_function_of_step():
    config = tiny_config("/nonexistent", steps=1, scene_fraction=0.0, uncond_prob=0.5, batch_size=4)
    a_images, a_prompts = training_batch(config, 7, "vae")
    b_images, b_prompts = training_batch(config, 7, "vae")
    c_images, _ = training_batch(config, 8, "vae")
    assert a_prompts == b_prompts and torch.equal(a_images, b_images)
    assert not torch.equal(a_images, c_images)
    assert a_images.shape == (4, 3, 32, 32) and a_images.min() >= -1 and a_images.max() <= 1
    assert "" in [p for step in range(10) for p in training_batch(config, step, "vae")[1]]


def test_latent_batch_draws_fill_and_scene_rows_and_drops_prompts():
    pool = LatentPool(torch.arange(10.0).view(10, 1, 1, 1), [f"fill {i}" for i in range(6)] + ["scene"] * 4, 6)
    config = tiny_config("/nonexistent", steps=1, scene_fraction=0.5, uncond_prob=0.25, batch_size=400)
    latents, prompts = latent_batch(config, 3, pool)
    again, _ = latent_batch(config, 3, pool)
    assert torch.equal(latents, again) and latents.shape == (400, 1, 1, 1)
    scene_share = float((latents.view(-1) >= 6).float().mean())
    assert 0.4 < scene_share < 0.6
    assert 0.15 < prompts.count("") / 400 < 0.35
    for value, prompt in zip(latents.view(-1).tolist(), prompts, strict=True):
        assert prompt in ("", pool.prompts[int(value)])


def test_lr_schedule_warms_up_and_decays():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.55)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="uncond_prob"):
        PretrainConfig(uncond_prob=1.5)
    with pytest.raises(ValueError, match="vae_steps"):
        PretrainConfig(vae_steps=5, model=BaseModelConfig(vae_channels=()))


def test_pretrain_base_flags_are_the_recipe_s_fields(tmp_path):
    import dataclasses

    from controlnet.builtin.config import DitModelConfig
    from controlnet.cli import build_parser
    from controlnet.settings_cli import given_values

    args = build_parser().parse_args(
        [
            "world",
            "pretrain-base",
            "--steps",
            "5",
            "--vae-lr",
            "1e-4",
            "--out",
            str(tmp_path),
            "--checkpoint-minutes",
            "0.5",
        ]
    )
    config = PretrainConfig(**given_values(args, PretrainConfig))
    assert (config.steps, config.vae_lr, config.out, config.checkpoint_minutes) == (5, 1e-4, str(tmp_path), 0.5)
    assert config.model == BaseModelConfig() and config.dit == DitModelConfig()  # the architectures have no flags
    scalar = {f.name for f in dataclasses.fields(PretrainConfig) if f.name not in ("model", "dit")}
    assert set(given_values(args, PretrainConfig)) == scalar  # every other field has its flag
