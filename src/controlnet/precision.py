"""Does this CPU compute in bfloat16 / float16 natively? One measured answer, and one warning line when not.

On a CPU without native bf16 (e.g. AVX2-only AMD EPYC) torch falls back to slow paths: one 3x3 convolution (320
channels, 32x32, batch 2) took 29.5 ms in float32 and 2,775 ms in bfloat16 on such a CPU. Flags in /proc/cpuinfo
do not tell the whole story (oneDNN's choice of kernel, other OSes), so this times the kind of work a UNet does:
a small convolution in float32 and in the asked dtype, once per process. A dtype more than SLOW_RATIO x slower
than float32 is reported as emulated. On CUDA nothing is measured: GPUs have the kernels.
"""

from __future__ import annotations

import time
from functools import cache

import torch

SLOW_RATIO = 3.0  # native bf16 is about as fast as fp32 or faster on CPU; the slow paths measured 10-90x
_REPEATS = 5


def _conv_seconds(dtype: torch.dtype) -> float:
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(dtype)
    x = torch.randn(1, 64, 32, 32).to(dtype)
    with torch.inference_mode():
        conv(x)  # warm-up: kernel selection
        times = []
        for _ in range(_REPEATS):
            started = time.perf_counter()
            conv(x)
            times.append(time.perf_counter() - started)
    return min(times)  # the fastest run: a busy machine slows some runs, never speeds one up


@cache
def cpu_slowdown(dtype: torch.dtype) -> float:
    """How many times slower than float32 a small convolution runs in `dtype` on this CPU (1.0 for float32)."""
    if dtype == torch.float32:
        return 1.0
    return _conv_seconds(dtype) / max(_conv_seconds(torch.float32), 1e-9)


def precision_warning(dtype: torch.dtype | None, device, what: str) -> str | None:
    """One line saying that `what` (e.g. "--dtype bf16") runs emulated on this CPU and what to use instead, or None
    when the dtype is float32, the device is not a CPU, or the CPU computes in it natively."""
    if dtype is None or dtype == torch.float32 or torch.device(device or "cpu").type != "cpu":
        return None
    ratio = cpu_slowdown(dtype)
    if ratio <= SLOW_RATIO:
        return None
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, str(dtype))
    return (
        f"{what}: this CPU has no native {name} kernels (a convolution ran {ratio:.0f}x slower than in float32); "
        "use float32 here (--dtype fp32 / --train.mixed_precision no), or a GPU"
    )
