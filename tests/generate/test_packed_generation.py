"""The pipeline's denoising loop on pre-packed oneDNN weights (generate/cpu_packing.py) gives the images of the plain
layers up to float rounding; packs are made for long enough loops and kept for the next generations."""

from __future__ import annotations

import pytest

from controlnet.generate import cpu_packing
from controlnet.generate.pipeline import MIN_PACKING_STEPS
from controlnet.testing.tiny_models import condition_image

pytestmark = pytest.mark.skipif(not cpu_packing.available(), reason="this torch build has no oneDNN")


def _packed_layers(pipe) -> int:
    """Layers running their packed forward now."""
    modules = [pipe.unet, *pipe.controlnets]
    return sum("forward" in vars(m) for root in modules for m in root.modules())


def test_packed_and_plain_generations_agree(sd_pipe, monkeypatch):
    # the tiny base's layers are below the size bounds: lowering them packs every conv and linear layer
    monkeypatch.setattr(cpu_packing, "MIN_CONV_WEIGHTS", 0)
    monkeypatch.setattr(cpu_packing, "MIN_LINEAR_WEIGHTS", 0)
    seen = []
    conds = [condition_image(1, 64), condition_image(2, 64)]

    def generate(steps):
        seen.clear()
        kwargs = dict(steps=steps, seed=5, output_type="np", width=64, height=64, guidance_scale=5.0)
        return sd_pipe(
            "a red cat", conds, progress=lambda i, n: seen.append(_packed_layers(sd_pipe)), **kwargs
        ).array

    packed = generate(MIN_PACKING_STEPS)
    assert min(seen) > 20 and _packed_layers(sd_pipe) == 0  # switched inside the loop only
    unpacked = cpu_packing.packed_bytes(sd_pipe.unet, *sd_pipe.controlnets)  # layers the loop never runs
    short_packed = generate(3)  # few steps, but the packs are kept from the first call
    assert min(seen) > 20 and cpu_packing.packed_bytes(sd_pipe.unet, *sd_pipe.controlnets) == unpacked

    sd_pipe.optimize(pack_cpu_weights=False)
    plain = generate(MIN_PACKING_STEPS)
    assert seen == [0] * MIN_PACKING_STEPS
    assert cpu_packing.packed_bytes(sd_pipe.unet, *sd_pipe.controlnets) > unpacked  # released
    assert plain.std() > 1e-3
    assert float(abs(packed - plain).max()) <= 1e-5  # images in [0, 1]

    sd_pipe.optimize(pack_cpu_weights=True)
    short_plain = generate(3)  # nothing kept and too few steps for packing to pay
    assert seen == [0, 0, 0]
    assert float(abs(short_packed - short_plain).max()) <= 1e-5
