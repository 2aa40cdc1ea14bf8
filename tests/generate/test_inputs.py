"""Bad input gives one clear error line (docs/style.md#errors-for-users-asserts-for-invariants): each check has a
test."""

from __future__ import annotations

import pytest

from controlnet.generate.pipeline import ControlNetPipeline
from controlnet.testing.tiny_models import condition_image

PROMPT = "a cat"


def conds(n=2):
    return [condition_image(1), condition_image(2)][:n]


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"control": conds(1)}, r"got 1 condition images for 2 ControlNets"),
        ({"control_start": 0.5, "control_end": 0.5}, r"start=0.5, end=0.5; expected 0 <= start < end <= 1"),
        ({"control_start": [0.0, 0.8], "control_end": [1.0, 0.2]}, r"ControlNet 1.*start=0.8, end=0.2"),
        ({"control_scale": [1.0, -0.5]}, r"control_scale\[1\]=-0.5: expected >= 0"),
        ({"image": condition_image(3), "strength": -0.1}, r"strength=-0.1: expected 0 < strength <= 1"),
        ({"width": 76, "height": 64}, r"76 x 64: both must be positive multiples of 8 \(the VAE's 8x"),
        ({"width": 64, "height": 0}, r"64 x 0: both must be positive multiples of 8"),
        ({"scheduler": "dpm++ 9m"}, r"unknown scheduler 'dpm\+\+ 9m'; expected one of: ddim"),
        ({"control_mode": "loud"}, r"unknown control mode 'loud'"),
        ({"resize_mode": "squash"}, r"unknown resize mode 'squash'"),
        ({"block_scales": [1.0, 2.0]}, r"block_scales\[0\] has 2 values; ControlNet 0 has 7 outputs"),
        ({"control_scale": [1.0]}, r"control_scale: got 1 values for 2 ControlNets"),
        ({"steps": 0}, r"steps=0"),
        ({"mask": condition_image(4)}, r"mask given without image"),
        ({"control": ["inpaint", condition_image(2)]}, r'control "inpaint" needs `image` and `mask`'),
        ({"guess_mode_form": "other"}, r"guess_mode_form='other'"),
        (
            {"image": condition_image(3), "strength": 0.2, "steps": 2},
            r"strength=0.2 with steps=2 leaves no denoising",
        ),
    ],
)
def test_bad_input_is_one_clear_value_error(sd_pipe, kwargs, pattern):
    kwargs = {"control": conds(), "steps": 1, **kwargs}
    with pytest.raises(ValueError, match=pattern) as err:
        sd_pipe(PROMPT, kwargs.pop("control"), **kwargs)
    assert "\n" not in str(err.value)


def test_missing_files_raise_file_not_found(sd_pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="condition image not found: .*nope.png"):
        sd_pipe(PROMPT, [tmp_path / "nope.png", condition_image(2)], steps=1)
    with pytest.raises(FileNotFoundError, match="base model not found"):
        ControlNetPipeline.from_pretrained(tmp_path / "no_model")
    with pytest.raises(FileNotFoundError, match="not a diffusers model folder"):
        ControlNetPipeline.from_pretrained(tmp_path)


def test_condition_size_is_scaled_to_the_native_size_when_not_given(sd_pipe):
    """A 40 px condition (once refused as not a multiple of 16) gives the base's native 64 x 64."""
    result = sd_pipe(PROMPT, [condition_image(1, size=40), condition_image(2, size=40)], steps=1, output_type="np")
    assert result.array.shape == (1, 64, 64, 3)
    assert result.control_images[0].size == (64, 64)
