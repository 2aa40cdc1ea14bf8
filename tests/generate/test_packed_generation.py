"""The pipeline's denoising loop on pre-packed oneDNN weights (model/cpu_packing.py) gives the images of the plain
layers up to float rounding."""

from __future__ import annotations

import pytest
from pipeline_tiny import condition_image

from controlnet.model import cpu_packing

pytestmark = pytest.mark.skipif(not cpu_packing.available(), reason="this torch build has no oneDNN")


def _packed_layers(pipe) -> int:
    modules = [pipe.unet, *pipe.controlnets]
    return sum(hasattr(m, "_controlnet_packed") for root in modules for m in root.modules())


def test_packed_and_plain_generations_agree(sd_pipe, monkeypatch):
    # the tiny base's layers are below the size bounds: lowering them packs every conv and linear layer
    monkeypatch.setattr(cpu_packing, "MIN_CONV_WEIGHTS", 0)
    monkeypatch.setattr(cpu_packing, "MIN_LINEAR_WEIGHTS", 0)
    seen = []
    kwargs = dict(steps=3, seed=5, output_type="np", width=64, height=64, guidance_scale=5.0)
    conds = [condition_image(1, 64), condition_image(2, 64)]

    def during_loop(step, total):
        seen.append(_packed_layers(sd_pipe))

    packed = sd_pipe("a red cat", conds, progress=during_loop, **kwargs).array
    assert min(seen) > 20 and _packed_layers(sd_pipe) == 0  # packed inside the loop only
    seen.clear()
    plain = sd_pipe.optimize(pack_cpu_weights=False)("a red cat", conds, progress=during_loop, **kwargs).array
    assert seen == [0, 0, 0]
    assert plain.std() > 1e-3
    assert float(abs(packed - plain).max()) <= 1e-5  # images in [0, 1]
