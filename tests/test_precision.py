"""precision.py: the measured answer to "does this CPU compute in bf16 / fp16 natively", and its one warning line."""

from __future__ import annotations

import pytest
import torch

from controlnet.precision import SLOW_RATIO, cpu_slowdown, precision_warning

pytestmark = pytest.mark.cpu_isa  # the answer depends on the CPU's kernels: also run with AVX2 kernels only


def test_float32_and_gpus_are_never_warned_about():
    assert cpu_slowdown(torch.float32) == 1.0
    assert precision_warning(None, "cpu", "--dtype fp32") is None
    assert precision_warning(torch.float32, "cpu", "--dtype fp32") is None
    assert precision_warning(torch.bfloat16, "cuda", "--dtype bf16") is None  # nothing measured for a GPU


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_the_warning_follows_the_measurement(dtype, name):
    """Whichever this CPU is: a warning exactly when the dtype ran over SLOW_RATIO x slower, naming it and the fix."""
    ratio = cpu_slowdown(dtype)
    assert ratio > 0 and cpu_slowdown(dtype) == ratio  # measured once per process
    warning = precision_warning(dtype, "cpu", f"--dtype {name}")
    assert (warning is not None) == (ratio > SLOW_RATIO)
    if warning is not None:
        assert warning.startswith(f"--dtype {name}: this CPU has no native {name} kernels")
        assert "use float32" in warning and "\n" not in warning
