"""controlnet.allocator: freed blocks are reused instead of being faulted back in from the kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest

from controlnet.allocator import reuse_freed_memory

# training steps in miniature: 32 activations of ~1 MiB, written, freed, allocated again a little larger (as a new
# bucket or batch shape would be); prints the minor page faults of five steps after two warm-up ones. glibc's
# default mmap threshold only follows the largest block freed so far, so each step gets fresh pages from the kernel.
STEPS = """
import resource, sys, torch
from controlnet.allocator import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
if sys.argv[1] == "pipeline":  # what `controlnet generate` does on a CPU (its --no-reuse-freed-memory turns it off)
    from controlnet.generate.base import check_base
    from controlnet.generate.pipeline import ControlNetPipeline
    ControlNetPipeline.from_pretrained(check_base("builtin")).optimize(reuse_freed_memory=True)
def step(k):
    activations = [torch.empty((2**20 + k * 2**16) // 4).fill_(1.0) for _ in range(32)]
    del activations
step(0); step(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for k in range(2, 7):
    step(k)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not reuse_freed_memory(), reason="mallopt needs glibc")
def test_freed_activations_are_reused_not_faulted_back_in():
    default, reused = page_faults("default"), page_faults("reuse")
    # 5 steps x ~40 MiB: ~50k pages of 4 KiB faulted in with glibc's defaults (measured 51360); reused, only the
    # heap's growth by 2 MiB a step (measured 2576-2864)
    assert default > 20000
    assert reused < default / 5


@pytest.mark.skipif(not reuse_freed_memory(), reason="mallopt needs glibc")
@pytest.mark.slow  # the default suite's 15-minute budget (the clean-clone run took 906 s); -m slow
def test_pipeline_optimize_keeps_freed_memory_on_the_cpu():
    assert page_faults("pipeline") < page_faults("default") / 5
