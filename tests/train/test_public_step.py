"""The trainer's public one-step seam (`setup`, `build_model`, `step`), as the benchmarks drive it."""

from __future__ import annotations

import math

import torch
from train_helpers import tiny_config
from train_tiny import make_tiny_base

from controlnet.train.trainer import StepResult, Trainer

ZERO_CONVS = ("controlnet_down_blocks.", "controlnet_mid_block.")  # paper Sec. 3.1: initialised to 0


def test_one_step_trains_the_controlnet_and_leaves_the_locked_unet_as_it_was(fill_data, tmp_path):
    base = make_tiny_base()
    unet_before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    trainer = Trainer(tiny_config(fill_data, tmp_path / "run"), base)
    trainer.setup()
    trainer.build_model()
    net_before = {k: p.detach().clone() for k, p in trainer.controlnet.named_parameters()}
    assert all(v.abs().sum() == 0 for k, v in net_before.items() if k.startswith(ZERO_CONVS))

    result = trainer.step(0)

    assert isinstance(result, StepResult) and not result.skipped
    assert math.isfinite(result.loss) and result.loss > 0
    after = dict(trainer.controlnet.named_parameters())
    zero_conv_weights = [k for k in after if k.startswith(ZERO_CONVS) and k.endswith("weight")]
    assert zero_conv_weights and all(after[k].abs().sum() > 0 for k in zero_conv_weights)  # left 0 at step 1
    assert all(p.requires_grad for p in after.values())
    unet_after = base.unet.state_dict()
    assert unet_after.keys() == unet_before.keys()
    assert all(torch.equal(unet_before[k], unet_after[k]) for k in unet_before)  # locked: not one value moved
    assert not any(p.requires_grad for p in base.unet.parameters())
    # the next step continues from there: the copy itself now gets gradients through the zero convs
    loss, skipped = trainer.step(1)
    assert math.isfinite(loss) and not skipped
    assert all(torch.equal(unet_before[k], base.unet.state_dict()[k]) for k in unet_before)
