"""Device and speed options: CPU offload, channels_last, bf16 (CPU), and fp16 + compile on CUDA (skipped without)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from controlnet.generate.pipeline import ControlNetPipeline
from controlnet.testing.tiny_models import condition_image


def fresh(parts) -> ControlNetPipeline:
    p = copy.deepcopy(parts)  # the session fixture's modules must not change dtype or device
    return ControlNetPipeline(p["unet"], p["vae"], p["text_encoder"], p["tokenizer"], p["scheduler"], p["nets"])


def run(pipe, **kw):
    return pipe("a cat", [condition_image(1), condition_image(2)], steps=1, output_type="np", **kw).array


def test_offload_and_channels_last_leave_results_unchanged(sd_parts):
    ref = run(fresh(sd_parts))
    offloaded = fresh(sd_parts).enable_model_cpu_offload("cpu")
    assert offloaded.device == torch.device("cpu")
    assert np.abs(run(offloaded) - ref).max() <= 1e-6
    cl = fresh(sd_parts).optimize(channels_last=True)
    assert cl.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(run(cl) - ref).max() <= 1e-3


def test_bfloat16_runs(sd_parts):
    pipe = fresh(sd_parts).to(dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.controlnets[0].dtype == torch.bfloat16
    out = run(pipe)
    assert out.dtype == np.float32 and np.isfinite(out).all() and out.shape == (1, 64, 64, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_channels_last_compile_and_offload(sd_parts):
    ref = run(fresh(sd_parts))
    fast = fresh(sd_parts).to("cuda", torch.float16).optimize(channels_last=True, compile=True)
    assert np.abs(run(fast) - ref).mean() < 0.05
    offloaded = fresh(sd_parts).enable_model_cpu_offload("cuda")
    assert np.abs(run(offloaded) - ref).max() < 1e-3
    assert next(offloaded.unet.parameters()).device.type == "cpu"  # back on the CPU after the call
