"""Training ControlNets on tiny random SD3 and Flux bases (diffusers folders): the rectified-flow objective against
diffusers' scheduler, the loss falling, exports that diffusers and `controlnet generate` load, exact resume, and the
settings a transformer base refuses before any weights are read."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetModel, SD3ControlNetModel
from train_helpers import final_weights

from controlnet.train import flow_matching as fm
from controlnet.train.checkpoint import list_checkpoints
from controlnet.train.config import resolve_config
from controlnet.train.trainer import Trainer, train
from controlnet.train.transformer_step import ControlledTransformer, micro_loss

SIZE = 8  # px; the tiny bases' VAE has factor 1: an 8x8 latent (SD3 64 tokens, Flux 16 packed tokens)
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


@pytest.fixture
def world(transformer_world):
    return transformer_world  # conftest.py: the tiny SD3 and Flux folders, built once per session


def flow_config(world: dict, arch: str, out: Path, **overrides):
    values = {
        "model.base": str(world[arch]),
        "model.transformer_layers": "1",
        "data.path": str(world["data"]),
        "data.resolution": str(SIZE),
        "train.output_dir": str(out),
        "train.max_steps": "4",
        "train.batch_size": "4",
        "train.log_every": "1",
        "optim.lr": "1e-3",
        "checkpoint.every": "0",
    }
    if arch == "flux":
        values["model.transformer_single_layers"] = "1"
    values.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
    return resolve_config(None, values)


def _cli_args(config) -> list[str]:
    """`controlnet train` flags of every setting that differs from its default."""
    defaults = resolve_config(None, {}).to_dict()
    args = []
    for section, fields in config.to_dict().items():
        for name, value in fields.items():
            if value != defaults[section][name]:
                text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
                args += [f"--{section}.{name}", text.lower() if isinstance(value, bool) else text]
    return args


# ---------------------------------------------------------------------------------------------------------------
# the objective
def test_interpolation_target_and_sigmas_match_an_independent_computation():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    grid = fm.sigma_grid(1000, fm.training_shift(scheduler.config, 0.0, 64))
    torch.testing.assert_close(grid, scheduler.sigmas[:1000], rtol=0, atol=1e-6)  # the scheduler's shifted sigmas
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigmas = fm.sample_sigmas("logit_normal", 3, grid, torch.Generator().manual_seed(1))
    # diffusers' own forward process: scale_noise(x0, t, eps) = s eps + (1 - s) x0 at the scheduler's timestep t
    expected = scheduler.scale_noise(x0, sigmas * 1000, noise)
    torch.testing.assert_close(fm.interpolate(x0, noise, sigmas), expected, rtol=0, atol=1e-5)
    # the target is the velocity: (x_{s+h} - x_s) / h, exact for a straight line
    h = 0.125
    slope = (fm.interpolate(x0, noise, sigmas + h) - fm.interpolate(x0, noise, sigmas)) / h
    torch.testing.assert_close(fm.velocity_target(x0, noise), slope, rtol=0, atol=1e-4)
    # sigma_sqrt weights each sample by s^-2; logit_normal not at all
    pred = torch.zeros_like(x0)
    per_sample = ((pred - noise + x0) ** 2).reshape(3, -1).mean(1)
    torch.testing.assert_close(
        fm.flow_loss(pred, noise - x0, sigmas, "sigma_sqrt"), (per_sample / sigmas**2).mean()
    )
    torch.testing.assert_close(fm.flow_loss(pred, noise - x0, sigmas, "logit_normal"), per_sample.mean())
    # Flux dev's dynamic shifting: exp(mu) of the token count, FluxPipeline's mu
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    assert fm.training_shift(dynamic.config, 0.0, 256) == pytest.approx(2.718281828**0.5)
    assert fm.training_shift(dynamic.config, 2.0, 256) == 2.0


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_micro_batch_is_the_rectified_flow_of_the_cached_latents(world, arch, tmp_path):
    trainer = Trainer(flow_config(world, arch, tmp_path / "run"))
    trainer.setup()
    batch = trainer.data.micro_batch(0)
    b = len(batch.sigmas)
    s = batch.sigmas.reshape(b, *[1] * (batch.x0.ndim - 1))
    noise = batch.target + batch.x0  # target = eps - x_0
    torch.testing.assert_close(batch.noisy, (1 - s) * batch.x0 + s * noise, rtol=0, atol=1e-6)
    n_train = trainer.base.scheduler.config.num_train_timesteps
    divisor = fm.FLUX_TIMESTEP_DIVISOR if arch == "flux" else 1.0
    torch.testing.assert_close(batch.timesteps, batch.sigmas * n_train / divisor)
    assert batch.cond.shape == batch.x0.shape  # the condition as VAE latents in the latent's layout
    if arch == "flux":
        channels = trainer.base.vae.config.latent_channels * 4
        assert batch.x0.shape == (b, (SIZE // 2) ** 2, channels) and batch.img_ids.shape == ((SIZE // 2) ** 2, 3)
    assert batch.context.shape[0] == b and batch.pooled.shape[0] == b
    assert trainer.data.micro_batch(0).noisy.equal(batch.noisy)  # a pure function of (seed, micro-step)


# ---------------------------------------------------------------------------------------------------------------
# training, export, generation
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_loss_falls_and_the_export_loads_in_diffusers(world, arch, tmp_path):
    from controlnet.io.api import load_controlnet

    config = flow_config(world, arch, tmp_path / "run", train__max_steps=16, optim__lr=3e-3)
    trainer = Trainer(config)
    summary = trainer.run()
    assert summary.status == "finished"
    # the loss on the training micro-batches (fixed noise and s: a pure function of the micro-step), of the trained
    # net and of the net at step 0, which is the base alone (zero layers, Eq. 3): the zero layers zeroed again
    start = copy.deepcopy(trainer.controlnet)
    with torch.no_grad():
        for name, p in start.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks")):
                p.zero_()
    after, before = _loss(trainer, trainer.controlnet), _loss(trainer, start)
    print(f"{arch}: flow loss {before:.3f} at step 0 -> {after:.3f} after 16 steps")
    assert after < 0.9 * before, (before, after)
    kind = SD3ControlNetModel if arch == "sd3" else FluxControlNetModel
    net = kind.from_pretrained(str(summary.final_dir / "controlnet"))
    state = final_weights(tmp_path / "run")
    assert net.state_dict().keys() == state.keys()
    assert all(torch.equal(net.state_dict()[k], state[k]) for k in state)
    single = load_controlnet(summary.final_dir / "controlnet.safetensors")  # the publisher's file: diffusers names
    assert all(torch.equal(single.state_dict()[k], state[k]) for k in state)


@torch.no_grad()
def _loss(trainer: Trainer, net) -> float:
    """The mean flow loss of `net` on the first 4 micro-batches of training."""
    model = ControlledTransformer(net, trainer.base.transformer, trainer.base.arch, 3.5)
    losses = [micro_loss(model, trainer.data.micro_batch(k), torch.float32, "logit_normal") for k in range(4)]
    return float(torch.stack(losses).mean())


def test_controlnet_generate_runs_the_exported_net(world, tmp_path):
    from controlnet.cli import main

    summary = train(flow_config(world, "flux", tmp_path / "run", train__max_steps=1))
    out = tmp_path / "out"
    cond = next(Path(world["data"]).rglob("*.png"))
    code = main(
        [
            "generate",
            "a red square",
            "--base",
            str(world["flux"]),
            "--controlnet",
            str(summary.final_dir / "controlnet"),
        ]
        + ["--cond", str(cond), "--steps", "2", "--width", "16", "--height", "16", "--out", str(out)]
        + ["--device", "cpu"]
    )
    assert code in (0, None)
    from PIL import Image

    assert Image.open(out / "controlnet-0.png").size == (16, 16)


def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(world, tmp_path):
    extra = dict(optim__grad_accum=2, optim__ema_decay=0.9, checkpoint__every=1, train__max_steps=3)
    train(flow_config(world, "flux", tmp_path / "full", **extra))
    first = Trainer(flow_config(world, "flux", tmp_path / "resumed", **extra), callback=lambda i: _stop_at(i, 1))
    assert first.run().status == "interrupted"
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-0000001"]
    assert train(flow_config(world, "flux", tmp_path / "resumed", **extra)).step == 3
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_and_buckets_train_the_same_weights(world, tmp_path):
    extra = dict(train__max_steps=2, data__bucketing=True, data__resolution=8)
    train(flow_config(world, "flux", tmp_path / "plain", **extra))
    train(flow_config(world, "flux", tmp_path / "ckpt", model__gradient_checkpointing=True, **extra))
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "ckpt")
    assert a.keys() == b.keys()
    for k in a:  # recomputation gives the same gradients, up to the order of float sums
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _stop_at(info, step: int) -> None:
    """Act like SIGTERM arriving during `step`: the loop saves and exits after it."""
    if info.step == step:
        os.kill(os.getpid(), signal.SIGTERM)


# ---------------------------------------------------------------------------------------------------------------
# refusals before any weights are read
@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"model__sd_locked": "false"}, "model.sd_locked=false: a UNet-base setting"),
        ({"model__architecture": "lite"}, "model.architecture=lite"),
        ({"model__transformer_layers": "9"}, "model.transformer_layers=9: expected 1..3"),
        ({"model__transformer_single_layers": "1"}, "SD3 has no single-stream blocks"),
        ({"data__resolution": "12", "model__transformer_layers": "1"}, None),
    ],
)
def test_unsupported_settings_are_refused_in_one_line_before_loading(
    world, tmp_path, monkeypatch, override, words
):
    import controlnet.train.trainer as trainer_module

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(trainer_module, "load_base", no_loading)
    config = flow_config(world, "sd3", tmp_path / "run", **override)
    if words is None:  # 12 px is fine on SD3 (patch 1, VAE factor 1): no refusal, loading is reached
        with pytest.raises(AssertionError, match="weights were loaded"):
            train(config)
        return
    with pytest.raises(ValueError, match=words.replace(".", r"\.")) as error:
        train(config)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_flux_size_must_fit_the_packing(world, tmp_path):
    with pytest.raises(ValueError, match=r"data\.resolution=9: expected a multiple of 2"):
        train(flow_config(world, "flux", tmp_path / "run", data__resolution=9))


# ---------------------------------------------------------------------------------------------------------------
# slow: a real process killed during training, both families
def _logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [x for x in path.read_text().splitlines() if x.strip().endswith("}")]
    return max((json.loads(x).get("step", 0) for x in lines), default=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_sigkilled_process_resumes_bitwise_equal(world, arch, tmp_path):
    extra = dict(checkpoint__every=1, checkpoint__keep=2, train__max_steps=8, optim__ema_decay=0.9)
    cmd = [sys.executable, "-m", "controlnet.cli", "train", "--quiet"]
    straight = cmd + _cli_args(flow_config(world, arch, tmp_path / "straight", **extra))
    done = subprocess.run(straight, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "killed"
    args = cmd + _cli_args(flow_config(world, arch, run, **extra))
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and _logged_step(run) < 3 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _logged_step(run)
    assert 0 < killed_at < 8  # killed during training
    last = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-3000:]
    a, b = final_weights(tmp_path / "straight"), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
