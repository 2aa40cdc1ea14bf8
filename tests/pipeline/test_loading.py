"""`ControlNetPipeline.from_pretrained`: a diffusers folder + ControlNet files give the same images as components."""

from __future__ import annotations

import numpy as np
import pytest
from pipeline_tiny import condition_image

from controlnet.pipeline import ControlNetPipeline


def test_folder_and_controlnet_files_match_components(sd_pipe, saved):
    loaded = ControlNetPipeline.from_pretrained(
        saved / "base", controlnets=[saved / "cn_diffusers", saved / "cn_original.safetensors"]
    )
    conds = [condition_image(1), condition_image(2)]
    a = loaded("a cat", conds, steps=2, output_type="np").array
    b = sd_pipe("a cat", conds, steps=2, output_type="np").array
    assert np.abs(a - b).max() <= 1e-6
    assert loaded.base_name.endswith("base")


def test_missing_controlnet_file(saved):
    with pytest.raises(FileNotFoundError, match="ControlNet not found"):
        ControlNetPipeline.from_pretrained(saved / "base", controlnets=[saved / "missing.safetensors"])


def test_builtin_base_loads_when_shipped():
    from controlnet.world import base as world_base

    if not (world_base.BUILTIN_DIR / world_base.BASE_CONFIG_NAME).is_file():
        pytest.skip("the built-in base model's weights are not shipped yet")
    pipe = ControlNetPipeline.from_pretrained("builtin")
    out = pipe("a red circle", [], steps=2, output_type="np").array
    assert out.shape[1] == pipe.unet.config.sample_size * pipe.vae_scale_factor
