"""`--train.distributed fsdp --train.mixed_precision bf16` (train/sharding.py's `mixed_precision_policy`): the trainable
net's fp32 shards all-gathered in bf16 under autocast, on 2 real CPU processes (gloo, `accelerate launch`): bf16 DDP's
losses, an fp32 export close to DDP's, fp32 shards; fp16 refused in one line."""

from __future__ import annotations

import pytest
import torch
from test_distributed import _losses
from test_fsdp import LR, STEPS, _launch, _param_bytes
from train_helpers import final_weights, tiny_config


@pytest.mark.slow
def test_bf16_fsdp_matches_bf16_ddp_keeps_fp32_shards_and_exports_fp32(fill_data, base_dir, tmp_path):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    bf16 = ("--train.mixed_precision", "bf16")
    t_ddp = _launch(fill_data, base_dir, ddp, *bf16)
    t_fsdp = _launch(fill_data, base_dir, fsdp, *bf16, "--train.distributed", "fsdp")
    print(f"2-process bf16 runs: ddp {t_ddp:.1f} s, fsdp {t_fsdp:.1f} s")

    one, two = _losses(ddp), _losses(fsdp)
    print(f"bf16 losses: ddp {one}, fsdp {two}")
    assert len(one) == len(two) == STEPS
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-2, atol=1e-3)

    # the export is gathered from the fp32 master shards, not from a bf16 gather
    a, b = final_weights(ddp), final_weights(fsdp)
    assert a.keys() == b.keys()
    for k in a:  # within AdamW's bound of 1 lr per step (+ rounding), as the bf16 ZeRO-3 test
        assert b[k].dtype == torch.float32, k
        assert (b[k] - a[k]).abs().max() <= 2 * LR * STEPS, k

    # the shards stay fp32: half of DDP's fp32 trainable bytes per rank (bf16 shards would be a quarter)
    b_ddp, b_fsdp = _param_bytes(ddp), _param_bytes(fsdp)
    print(f"trainable parameter bytes per rank (bf16 runs): ddp {b_ddp}, fsdp {b_fsdp}")
    assert all(0.45 * b_ddp[0] <= b <= 0.55 * b_ddp[0] for b in b_fsdp)


def test_fsdp_refuses_fp16_in_one_line(fill_data, tmp_path):
    from controlnet.train.sharding import check_fsdp, mixed_precision_policy

    c = tiny_config(fill_data, tmp_path / "run", train__distributed="fsdp", train__mixed_precision="fp16")
    with pytest.raises(ValueError, match=r"train.distributed=fsdp: train.mixed_precision=fp16 \(use bf16\)"):
        check_fsdp(c, "unet")
    check_fsdp(
        tiny_config(fill_data, tmp_path / "run", train__distributed="fsdp", train__mixed_precision="bf16"), "unet"
    )
    policy = mixed_precision_policy(torch.bfloat16)
    assert (policy.param_dtype, policy.reduce_dtype, policy.cast_forward_inputs) == (
        torch.bfloat16,
        torch.float32,
        False,
    )
    assert mixed_precision_policy(torch.float32) is None


def test_bf16_policy_gathers_bf16_keeps_fp32_shards_and_grads_and_gives_bf16_residuals(tmp_path):
    """One gloo process (the mechanism, in-process): inside the forward the trainable net's weights are bf16 (the
    policy's gather), its float timesteps reach the time projection unrounded (cast_forward_inputs=False), the
    residuals are bf16 under autocast (the locked bf16 base's dtype), and the shards and their gradients stay fp32."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from train_tiny import make_tiny_base

    from controlnet.model.controlnet import ControlNet
    from controlnet.train.sharding import shard_controlnet

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = ControlNet.from_unet(make_tiny_base().unet.float(), hint_downscale_factor=1).train()
        shard_controlnet(net, torch.device("cpu"), compute_dtype=torch.bfloat16)
        seen = {}

        def record(name, value):  # a forward pre-hook returning None leaves the inputs as they are
            seen.setdefault(name, value)

        net.down_blocks[0].register_forward_pre_hook(lambda m, args: record("weight", next(m.parameters()).dtype))
        net.time_proj.register_forward_pre_hook(lambda m, args: record("timesteps", args[0].clone()))
        torch.manual_seed(1)
        sample, cond = torch.randn(2, 3, 16, 16), torch.rand(2, 3, 16, 16)  # (B, C, H, W)
        context = torch.randn(2, 4, 16).bfloat16()  # (B, L, D): the bf16 text encoder's output
        timesteps = torch.tensor([734.6, 12.3])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(sample, timesteps, context, cond)
        residuals = [*out.down, out.mid]
        assert seen["weight"] == torch.bfloat16
        assert seen["timesteps"].dtype == torch.float32
        torch.testing.assert_close(seen["timesteps"], timesteps, rtol=0, atol=0)
        assert {r.dtype for r in residuals} == {torch.bfloat16}
        sum(r.float().square().sum() for r in residuals).backward()
        params = list(net.parameters())
        assert all(isinstance(p, DTensor) and p.to_local().dtype == torch.float32 for p in params)
        assert {p.grad.dtype for p in params if p.grad is not None} == {torch.float32}
    finally:
        dist.destroy_process_group()
