"""Training on the one base loader's bundle: the same latent space as generation, a resume that says so."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from train_helpers import tiny_config
from train_tiny import TINY_SIZE, make_fill_dataset, make_tiny_base, save_tiny_base

from controlnet.generate.base import BaseComponents, denormalize_latents, normalize_latents


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "controlnet.cli", *map(str, args)], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # the default suite's 15-minute budget; run with -m slow
def test_resumed_training_says_so(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    data = make_fill_dataset(tmp_path / "data", n=8)
    args = [
        "train",
        "--model.base",
        base,
        "--data.path",
        data,
        "--data.resolution",
        TINY_SIZE,
        "--train.output_dir",
        tmp_path / "run",
        "--train.batch_size",
        2,
        "--model.hint_channels",
        "8,16",
        "--checkpoint.every",
        1,
    ]
    first = _cli(*args, "--train.max_steps", 1)
    assert first.returncode == 0 and "resuming" not in first.stderr, first.stderr[-2000:]
    again = _cli(*args, "--train.max_steps", 2)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from checkpoint step 1" in again.stderr


def test_training_latents_are_the_pipelines_for_a_vae_with_latents_mean_and_std(tmp_path):
    """A VAE with latents_mean/std: z_0 recovered from a training step's (z_t, eps) = the pipeline's encoding."""
    from accelerate import Accelerator

    from controlnet.generate.pipeline import ControlNetPipeline
    from controlnet.train.batches import TrainingBatches

    data = make_fill_dataset(tmp_path / "data", n=4)
    recovered = {}
    for stats in (False, True):
        b = make_tiny_base(latent=True)
        if stats:
            b.vae.register_to_config(latents_mean=[0.5, -0.2, 0.1, 0.0], latents_std=[2.0, 0.5, 1.5, 1.0])
        with torch.no_grad():  # a (near) deterministic posterior: std = exp(-15), so z_0 = the posterior mean
            b.vae.quant_conv.bias[4:] = -30.0
        base = BaseComponents(b.unet, b.vae, b.text_encoder, b.tokenizer, b.scheduler)
        config = tiny_config(data, tmp_path / "run", data__cache="false", train__batch_size=1)
        batches = TrainingBatches(config, base, Accelerator(cpu=True), tmp_path / "cache", torch.float32)
        batch = batches.micro_batch(0)
        abar = batches.noise_scheduler.alphas_cumprod[batch.timesteps].view(-1, 1, 1, 1)
        z0 = (batch.noisy - (1 - abar).sqrt() * batch.target) / abar.sqrt()  # (1, 4, h, w)
        epoch, positions = batches.plan.batch(0)
        pixels = batches.pixels.load(positions[0], epoch)[0][None]  # (1, 3, H, W) in [-1, 1]
        pipe = ControlNetPipeline.from_components(base)
        torch.testing.assert_close(z0, pipe._encode_image(pixels), atol=1e-4, rtol=1e-4)
        assert torch.allclose(denormalize_latents(b.vae, normalize_latents(b.vae, z0)), z0, atol=1e-6)
        recovered[stats] = z0
    assert (recovered[True] - recovered[False]).abs().max() > 0.1  # the statistics do change the latent space
