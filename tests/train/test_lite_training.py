"""The trainer's model.architecture=lite (the paper's ControlNet-lite ablation, Fig. 8c): trains, exports its own
folder, and the pipeline runs the exported net."""

from __future__ import annotations

import pytest
import torch
from train_helpers import tiny_config
from train_tiny import make_tiny_base

from controlnet.generate.pipeline import ControlNetPipeline
from controlnet.io.api import load_controlnet
from controlnet.io.lite import is_lite_folder
from controlnet.model.lite import ControlNetLite
from controlnet.train.config import ModelConfig
from controlnet.train.trainer import train


def test_trainer_option_trains_and_exports_a_lite_net_the_pipeline_runs(fill_data, tmp_path):
    base = make_tiny_base()
    config = tiny_config(fill_data, tmp_path / "run", train__max_steps=3, model__architecture="lite")
    summary = train(config, base)
    assert summary.status == "finished" and summary.step == 3
    folder = tmp_path / "run" / "final" / "controlnet"
    assert is_lite_folder(folder) and not (tmp_path / "run" / "final" / "controlnet.safetensors").exists()
    net = load_controlnet(folder, unet=base.unet)
    assert isinstance(net, ControlNetLite)
    assert net.controlnet_mid_block.weight.abs().sum() > 0  # trained away from zero
    pipe = ControlNetPipeline.from_components(base, [net])
    cond = (torch.rand(16, 16, 3) * 255).to(torch.uint8).numpy()
    image = pipe("red circle", [cond], steps=2, seed=0, width=16, height=16, output_type="np").array
    assert image.shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="model.architecture='copy': expected one of controlnet, lite"):
        ModelConfig(architecture="copy")
    with pytest.raises(ValueError, match="only for a fresh net"):
        ModelConfig(architecture="lite", controlnet="builtin:fill")
