"""`--model.connection_init gaussian` on a transformer base: the trainer's fresh SD3 net starts with the ablation's
Gaussian connections (model/ablations.py), zero leaves them zero; lite and union are refused there in one line."""

from __future__ import annotations

import pytest
import torch
from train_tiny import make_fill_dataset

from controlnet.model.ablations import connection_layers, gaussian_connections
from controlnet.model.transformer_controlnet import SD3ControlNet
from controlnet.testing.tiny_transformer_bases import write_sd3_base
from controlnet.train.config import resolve_config
from controlnet.train.trainer import Trainer, train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer-connections")
    return {"data": make_fill_dataset(root / "fill", n=8), "sd3": write_sd3_base(root / "sd3" / "base")}


def config(world: dict, out, **overrides):
    values = {
        "model.base": str(world["sd3"]),
        "model.transformer_layers": "2",
        "data.path": str(world["data"]),
        "data.resolution": "8",
        "train.output_dir": str(out),
        "train.max_steps": "1",
        "train.batch_size": "2",
        "train.seed": "5",
        "checkpoint.every": "0",
        **overrides,
    }
    return resolve_config(None, values)


def test_the_trainer_gives_a_fresh_sd3_net_gaussian_connections_when_asked(world, tmp_path):
    nets = {}
    for init in ("zero", "gaussian"):
        trainer = Trainer(config(world, tmp_path / init, **{"model.connection_init": init}))
        trainer.setup()
        trainer.build_model()
        nets[init] = trainer.controlnet
    expected = gaussian_connections(SD3ControlNet.from_transformer(trainer.base.transformer.float(), 2), seed=5)
    for zero, gaussian, want in zip(*(connection_layers(n) for n in (*nets.values(), expected)), strict=True):
        assert not zero.weight.any() and not zero.bias.any()
        torch.testing.assert_close(
            gaussian.weight, want.weight, rtol=0, atol=0
        )  # the ablation, seeded by train.seed
        assert not gaussian.bias.any()
    others = {k: v for k, v in nets["gaussian"].state_dict().items() if k in nets["zero"].state_dict()}
    changed = {k for k, v in others.items() if not torch.equal(v, nets["zero"].state_dict()[k])}
    assert changed == {"pos_embed_input.proj.weight", "controlnet_blocks.0.weight", "controlnet_blocks.1.weight"}


@pytest.mark.parametrize("architecture", ["lite", "union"])
def test_lite_and_union_are_refused_on_a_transformer_base_in_one_line(world, tmp_path, architecture):
    with pytest.raises(ValueError, match=rf"model\.architecture={architecture}: a UNet-base setting") as error:
        train(config(world, tmp_path / "run", **{"model.architecture": architecture}))
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()
