"""ControlNet++'s consistency reward on flow (transformer) bases: tiny random SD3 and Flux diffusers folders."""

from __future__ import annotations

import pytest
import torch
from test_transformer_training import SIZE, flow_config
from train_helpers import final_weights

from controlnet.train import flow_matching as fm
from controlnet.train.trainer import Trainer, train
from controlnet.train.transformer_step import ControlledTransformer


@pytest.fixture
def world(transformer_world):
    return transformer_world  # conftest.py: the tiny SD3 and Flux folders, built once per session


def _config(world, arch, out, **overrides):
    """test_transformer_training's run config with the reward on (every timestep; soft Canny edges, which have a
    gradient on 8 px images where fill's outline region has none)."""
    reward = dict(train__reward="true", train__reward_max_timestep="1000", train__reward_detector="canny")
    return flow_config(world, arch, out, **{"train__max_steps": "2", **reward, **overrides})


def _built(world, arch, tmp_path, **overrides) -> Trainer:
    trainer = Trainer(_config(world, arch, tmp_path / "run", **overrides))
    trainer.setup()
    trainer.build_model()
    return trainer


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_one_step_x0_is_exact_on_a_tiny_flow_base(world, arch, tmp_path):
    """Given the true velocity eps - x_0, x0' = x_s - s v' is the batch's x_0 (Flux: unpacked to the latent grid),
    and the reward decodes it as the VAE decodes x_0 from the transformer's latent space."""
    trainer = _built(world, arch, tmp_path)
    batch, reward, vae = trainer.data.micro_batch(0), trainer.reward, trainer.base.vae
    x0 = reward.flow_x0(batch.target, batch)  # (b, C, h, w)
    expected = batch.x0 if arch == "sd3" else fm.unpack_latents(batch.x0, SIZE, SIZE)
    torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5)
    if arch == "flux":
        assert torch.equal(fm.pack_latents(expected), batch.x0)  # unpack inverts pack
    shift = vae.config.get("shift_factor") or 0.0
    with torch.no_grad():
        pixels = vae.decode(expected / vae.config.scaling_factor + shift).sample
        torch.testing.assert_close(reward.decode(x0), (pixels + 1) / 2)
    assert batch.cond_unit.shape == (len(batch.sigmas), 3, SIZE, SIZE)
    assert batch.cond_unit.min() >= 0 and batch.cond_unit.max() <= 1


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_flow_reward_reaches_the_controlnet_only_and_is_zero_above_the_threshold(world, arch, tmp_path):
    trainer = _built(world, arch, tmp_path, train__reward_max_timestep=500)
    batch, reward, base = trainer.data.micro_batch(0), trainer.reward, trainer.base
    net = trainer.controlnet
    model = ControlledTransformer(net, base.transformer, base.arch, 3.5)
    n = base.scheduler.config.num_train_timesteps
    divisor = fm.FLUX_TIMESTEP_DIVISOR if arch == "flux" else 1.0
    batch.sigmas = torch.tensor([0.1, 0.5, 0.5001, 0.9])  # s <= 500 / 1000 for the first two only
    batch.timesteps = batch.sigmas * n / divisor
    batch.noisy = fm.interpolate(batch.x0, batch.target + batch.x0, batch.sigmas)
    pred = model(
        batch.noisy, batch.timesteps, batch.context, batch.pooled, batch.cond, batch.img_ids, batch.txt_ids
    )
    terms = reward.flow_terms(pred, batch)
    assert (terms[:2] > 0).all() and (terms[2:] == 0).all()
    reward.flow_term(pred, batch).backward()
    assert all(p.grad is None for p in base.transformer.parameters())
    assert all(p.grad is None for p in base.vae.parameters())
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_a_reward_run_trains_a_flow_base_and_differs_from_plain(world, arch, tmp_path):
    summary = train(_config(world, arch, tmp_path / "reward"))
    assert summary.status == "finished"
    train(_config(world, arch, tmp_path / "plain", train__reward="false"))
    rewarded, plain = final_weights(tmp_path / "reward"), final_weights(tmp_path / "plain")
    assert rewarded.keys() == plain.keys()
    assert any(not torch.equal(rewarded[k], plain[k]) for k in plain)
