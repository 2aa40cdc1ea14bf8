"""benchmarks/scale_out_memory.py's arithmetic on the training tests' tiny ControlNet: its counts equal a real model's,
its DDP/FSDP2/ZeRO-3 weight bytes equal the per-rank bytes the 2-process trainer runs log, and the sharded parts
shrink as 1/N while the replicated ones stay."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# tests/train/test_fsdp.py and test_deepspeed.py (2 gloo processes, the `memory` event of metrics.jsonl, quoted in
# docs/scale-out.md): trainable parameter bytes per rank of this net, fp32
LOGGED_DDP, LOGGED_HALF = 428_576, 214_288


@pytest.fixture(scope="module")
def script():
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "train")]
    try:
        yield importlib.import_module("scale_out_memory")
    finally:
        del sys.path[:2]


def tiny_controlnet(script, device: str):
    """The trainer tests' tiny pixel-space UNet (train_tiny.TINY_UNET, hint channels 8,16, no VAE) and the
    ControlNet the trainer copies from it."""
    from diffusers import UNet2DConditionModel
    from train_tiny import TINY_UNET

    from controlnet.model.controlnet import ControlNet

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(1)
    return unet, ControlNet.from_unet(unet, hint_block_channels=(8, 16), hint_downscale_factor=1)


@pytest.fixture(scope="module")
def tiny(script):
    unet, net = tiny_controlnet(script, "meta")
    return script.pair_of("tiny", unet, net)


def test_counts_equal_a_real_models_and_the_bytes_the_trainer_logged(script, tiny):
    unet, net = tiny_controlnet(script, "cpu")  # real tensors: an independent count
    assert tiny.net_params == sum(p.numel() for p in net.parameters())
    assert tiny.base_values == sum(p.numel() for p in unet.parameters()) + sum(b.numel() for b in unet.buffers())
    ddp = script.per_gpu_bytes(tiny, "DDP", 2)
    assert ddp["weights"] == LOGGED_DDP  # fp32 weights, whole on each rank
    assert ddp == {"base": 2 * tiny.base_values, **{k: v * tiny.net_params for k, v in (("weights", 4),
                   ("grads", 4), ("moments", 8))}}  # fmt: skip
    assert script.per_gpu_bytes(tiny, "FSDP2", 2)["weights"] == LOGGED_HALF
    # the logged ZeRO-3 run was fp32 (the table's ZeRO rows are bf16 weights): its partition of fp32 weights
    assert script.shard_values(tiny.net_shapes, 2, "ZeRO-3") * script.FP32 == LOGGED_HALF


@pytest.mark.parametrize("engine", ["DDP", "FSDP2", "ZeRO-2", "ZeRO-3"])
def test_sharded_parts_shrink_as_one_over_n_and_the_rest_stays(script, tiny, engine):
    one = script.per_gpu_bytes(tiny, engine, 1)
    for world in (2, 8, 32):
        parts = script.per_gpu_bytes(tiny, engine, world)
        assert parts["base"] == one["base"]  # the locked base is never sharded
        for part, (replicated, sharded) in script.PARTS[engine].items():
            assert one[part] == (replicated + sharded) * tiny.net_params
            whole = replicated * tiny.net_params
            padding = sharded * sum(math.prod(s[1:]) for s in tiny.net_shapes)  # at most one padded row each
            shard = parts[part] - whole  # this rank's share of the sharded bytes: 1/N of them, plus padding
            assert (one[part] - whole) / world <= shard <= math.ceil((one[part] - whole) / world) + padding
    if engine == "DDP":
        assert script.per_gpu_bytes(tiny, engine, 32) == one
    if engine in ("FSDP2", "ZeRO-3"):  # everything but the base: 16/N bytes a parameter
        big = sum(v for k, v in script.per_gpu_bytes(tiny, engine, 8).items() if k != "base")
        assert big == pytest.approx(16 * tiny.net_params / 8, rel=0.05)


def test_table_and_doc_block(script, tiny, tmp_path):
    text = script.table([tiny])
    assert text.count("\n") == 2 + len(script.ENGINES)
    assert "| tiny |" in text and "2 + 14/N" in text and "| 16/N |" in text
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- results:scale_out_memory -->\nold\n<!-- /results:scale_out_memory -->\nafter\n")
    assert script.write_doc(doc, text)
    assert (
        doc.read_text()
        == f"before\n<!-- results:scale_out_memory -->\n{text}<!-- /results:scale_out_memory -->\nafter\n"
    )
    doc.write_text("no markers\n")
    assert not script.write_doc(doc, text)
    with pytest.raises(ValueError, match="engine='FSDP1'"):
        script.per_gpu_bytes(tiny, "FSDP1", 8)
    with pytest.raises(ValueError, match="world=0"):
        script.per_gpu_bytes(tiny, "DDP", 0)
