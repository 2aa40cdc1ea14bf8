"""ControlNet++'s consistency reward (train/reward.py, train/detectors.py) on tiny random bases."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import checkpoint_weights, final_weights, tiny_config
from train_tiny import make_fill_dataset, make_tiny_base

from controlnet.model.controlled_unet import ControlledUNet
from controlnet.model.controlnet import ControlNet
from controlnet.train import flow_matching as fm
from controlnet.train.checkpoint import list_checkpoints
from controlnet.train.config import resolve_config
from controlnet.train.reward import Reward, predict_x0, predict_x0_flow, resolve_detector
from controlnet.train.trainer import Trainer, train


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ddpm(prediction_type: str):
    """The tiny base's training schedule (train_tiny.make_tiny_base), predicting `prediction_type`."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type=prediction_type,
        clip_sample=False,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_prediction_is_the_schedulers_own(prediction_type):
    scheduler = _ddpm(prediction_type)
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 150, 700])
    noisy = scheduler.add_noise(x0, eps, t)
    pred = eps if prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)
    got = predict_x0(pred, noisy, scheduler.alphas_cumprod[t], prediction_type)
    torch.testing.assert_close(got, x0, rtol=1e-4, atol=1e-4)  # add_noise inverted
    for k in range(3):  # the scheduler's own step computes x0' too (DDPM Eq. 15)
        step = scheduler.step(pred[k : k + 1], int(t[k]), noisy[k : k + 1]).pred_original_sample
        torch.testing.assert_close(got[k : k + 1], step, rtol=1e-5, atol=1e-5)


def test_x0_prediction_is_exact_for_flow():
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)
    sigmas = fm.sigma_grid(1000, 3.0)[torch.tensor([0, 500, 990])]
    noisy = fm.interpolate(x0, eps, sigmas)
    got = predict_x0_flow(fm.velocity_target(x0, eps), noisy, sigmas)
    torch.testing.assert_close(got, x0, rtol=1e-5, atol=1e-5)


def _reward_setup(tmp_path, fill_data, max_timestep=200):
    base = make_tiny_base(latent=True)
    config = tiny_config(
        fill_data, tmp_path / "run", train__reward="true", train__reward_max_timestep=max_timestep
    )
    torch.manual_seed(0)
    net = ControlNet.from_unet(base.unet, hint_downscale_factor=2, hint_block_channels=(8, 16))
    net.requires_grad_(True)
    reward = Reward(config, base, _ddpm("epsilon"))
    return base, net, ControlledUNet(net, base.unet), reward


def _batch():
    torch.manual_seed(1)
    from controlnet.world.dataset import make_pair

    conds = [torch.from_numpy(make_pair("fill", s, 16)[0]).permute(2, 0, 1).float() / 255 for s in (3, 4)]
    return torch.randn(2, 4, 8, 8), torch.randn(2, 8, 16), torch.stack(conds)  # noisy, text, cond (2, 3, 16, 16)


def test_reward_gradient_reaches_the_controlnet_only(tmp_path, fill_data):
    base, net, model, reward = _reward_setup(tmp_path, fill_data)
    noisy, ctx, cond = _batch()
    t = torch.tensor([10, 150])
    term = reward.unet_term(model(noisy, t, ctx, cond), noisy, t, cond)
    assert term > 0
    term.backward()
    assert all(p.grad is None for p in base.unet.parameters())
    assert all(p.grad is None for p in base.vae.parameters())
    # the zero convs start at 0, so the reward's first gradients land on their weights (paper Sec. 3.1)
    assert net.controlnet_mid_block.weight.grad.abs().sum() > 0


def test_reward_is_zero_above_the_threshold(tmp_path, fill_data):
    base, net, model, reward = _reward_setup(tmp_path, fill_data)
    noisy, ctx, cond = _batch()
    t = torch.tensor([200, 201])  # t <= 200 gets the term, t = 201 none
    terms = reward.unet_terms(model(noisy, t, ctx, cond), noisy, t, cond)
    assert terms[0] > 0 and terms[1] == 0
    above = torch.tensor([201, 999])
    term = reward.unet_term(model(noisy, above, ctx, cond), noisy, above, cond)
    assert term == 0 and not term.requires_grad  # nothing decoded, nothing to back-propagate


def test_detectors_prefer_the_true_image():
    """Each detector's loss is lower on the world's ground truth than on a wrong image (it can fail)."""
    from controlnet.train.detectors import detector
    from controlnet.world.dataset import make_pair

    for name, task, size in (
        ("fill", "fill", 16),
        ("canny", "canny", 64),
        ("seg", "seg", 64),
        ("pose", "pose", 64),
    ):
        cond, truth, _ = make_pair(task, 7, size)
        _, other, _ = make_pair(task, 8, size)
        images = torch.from_numpy(truth[None]).permute(0, 3, 1, 2).float() / 255
        wrong = torch.from_numpy(other[None]).permute(0, 3, 1, 2).float() / 255
        c = torch.from_numpy(cond[None]).permute(0, 3, 1, 2).float() / 255
        loss = detector(name)
        assert loss(images, c) < loss(wrong, c), name


def test_a_condition_without_a_detector_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"train\.reward_detector='depth': no differentiable detector"):
        resolve_config(None, {"train.reward": "true", "train.reward_detector": "depth"})
    data = tmp_path / "pose-world"
    data.mkdir()
    (data / "world.json").write_text(json.dumps({"task": "depth"}))
    config = resolve_config(None, {"train.reward": "true", "data.path": str(data)})
    with pytest.raises(ValueError, match=r"world task 'depth'.*'depth': no differentiable detector") as info:
        resolve_detector(config)
    assert "\n" not in str(info.value)
    # refused before anything is read or loaded: the base named does not exist
    config = resolve_config(None, {"train.reward": "true", "data.path": str(data), "model.base": "builtin"})
    with pytest.raises(ValueError, match="no differentiable detector"):
        Trainer(config).setup()


def test_killed_reward_run_resumes_exactly(fill_data, tmp_path):
    extra = dict(
        train__reward="true",
        train__reward_max_timestep=600,
        optim__grad_accum=2,
        optim__ema_decay=0.9,
        checkpoint__every=2,
    )
    train(tiny_config(fill_data, tmp_path / "full", train__max_steps=4, **extra), make_tiny_base())
    first = tiny_config(fill_data, tmp_path / "resumed", train__max_steps=4, **extra)
    trainer = Trainer(first, make_tiny_base(), callback=lambda info: _stop_at(info, 2))
    assert trainer.run().status == "interrupted"
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-0000002"]
    summary = train(tiny_config(fill_data, tmp_path / "resumed", train__max_steps=4, **extra), make_tiny_base())
    assert summary.step == 4
    assert _equal(final_weights(tmp_path / "full"), final_weights(tmp_path / "resumed"))
    full_ckpt = checkpoint_weights(tmp_path / "full" / "checkpoints" / "step-0000004")
    assert _equal(full_ckpt, checkpoint_weights(tmp_path / "resumed" / "checkpoints" / "step-0000004"))
    # the reward changed the training: a plain run from the same seed ends elsewhere
    plain = {k: v for k, v in extra.items() if not k.startswith("train__reward")}
    train(tiny_config(fill_data, tmp_path / "plain", train__max_steps=4, **plain), make_tiny_base())
    assert not _equal(final_weights(tmp_path / "full"), final_weights(tmp_path / "plain"))


def _stop_at(info, step: int) -> None:
    """Act like SIGTERM arriving during `step`: the loop saves and exits after it."""
    if info.step == step:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)


def test_reward_trains_on_a_latent_base_through_the_vae(tmp_path):
    data = make_fill_dataset(tmp_path / "fill", n=8)
    base = make_tiny_base(latent=True)
    summary = train(
        tiny_config(
            data, tmp_path / "run", train__max_steps=2, train__reward="true", train__reward_max_timestep=1000
        ),
        base,
    )
    assert summary.status == "finished"
    assert all(p.grad is None for p in base.vae.parameters())
