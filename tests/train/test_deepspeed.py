"""`--train.distributed deepspeed` (DeepSpeed ZeRO-2/3 through accelerate, train/deepspeed_engine.py) with 2 real CPU
processes (gloo, `accelerate launch`): the same losses and export as DDP, an exact resume from the engine's checkpoint
(ZeRO-2 and ZeRO-3; bf16 ZeRO-3 close to bf16 DDP, exporting the fp32 masters), and the one-line refusals. Without deepspeed installed the runs skip, unless CONTROLNET_REQUIRE_DEEPSPEED=1 (CI with
the `deepspeed` extra) makes that a failure; the refusal of a missing deepspeed is tested either way."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import _args, _losses
from train_helpers import final_weights, tiny_config

from controlnet.testing.launch import accelerate_launch

STEPS, LR = 3, 1e-3
# per process 1 sample per micro-batch, 2 micro-batches per step: the engine's accumulation path is run too
BATCH = ("--train.batch_size", "1", "--optim.grad_accum", "2")


def _need_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        if os.environ.get("CONTROLNET_REQUIRE_DEEPSPEED") == "1":
            pytest.fail("CONTROLNET_REQUIRE_DEEPSPEED=1 but deepspeed is not installed")
        pytest.skip("deepspeed is not installed (pip install 'controlnet[deepspeed]')")


def _launch(fill_data, base_dir, out, *extra: str) -> float:
    """One 2-process run of 3 steps, global batch 4; its wall time."""
    cmd = [*accelerate_launch(2), *_args(fill_data, base_dir, out, 1), *BATCH, *extra]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    start = time.time()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return time.time() - start


def _param_bytes(run) -> list[int]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return next(x["trainable_param_bytes"] for x in lines if x.get("event") == "memory")


def _close_to_ddp(a: dict, b: dict) -> None:
    """As in test_distributed: gradients summed in another order flip AdamW's sign-like step for ~0 gradients."""
    assert a.keys() == b.keys()
    for k in a:
        close = torch.isclose(b[k], a[k], rtol=1e-3, atol=1e-5)
        assert close.float().mean() > 0.999, (k, (~close).sum().item())
        assert (b[k] - a[k]).abs().max() <= 2 * LR * STEPS, k


@pytest.fixture(scope="module")
def ddp_run(fill_data, base_dir, tmp_path_factory):
    _need_deepspeed()
    out = tmp_path_factory.mktemp("ddp") / "run"
    print(f"2-process ddp run: {_launch(fill_data, base_dir, out):.1f} s")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_matches_ddp_and_resumes_exactly(fill_data, base_dir, ddp_run, tmp_path, stage):
    _need_deepspeed()
    ds, resumed = tmp_path / "ds", tmp_path / "resumed"
    options = ("--train.distributed", "deepspeed", "--train.zero_stage", str(stage), "--checkpoint.every", "2")
    print(f"2-process ZeRO-{stage} run: {_launch(fill_data, base_dir, ds, *options):.1f} s")

    # the same losses as DDP for the same seeds and global batch
    one, two = _losses(ddp_run), _losses(ds)
    assert len(one) == len(two) == STEPS
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-6)

    # the export (gathered on rank 0) holds the same files, keys and nearly the same weights as DDP's
    _close_to_ddp(final_weights(ddp_run), final_weights(ds))
    _close_to_ddp(
        load_file(ddp_run / "final" / "controlnet.safetensors"), load_file(ds / "final" / "controlnet.safetensors")
    )
    # the update really happened (a skipped DeepSpeed step would leave the fresh net's zero convolutions at 0)
    assert any(v.abs().max() > 0 for k, v in final_weights(ds).items() if "zero_conv" in k or "controlnet_" in k)

    # per-process bytes of trainable weights: ZeRO-2 holds the whole net on each rank, ZeRO-3 about half of it
    b_ddp, b_ds = _param_bytes(ddp_run), _param_bytes(ds)
    print(f"trainable parameter bytes per rank: ddp {b_ddp}, ZeRO-{stage} {b_ds}")
    if stage == 2:
        assert b_ds == b_ddp
    else:
        assert all(0.45 * b_ddp[0] <= b <= 0.55 * b_ddp[0] for b in b_ds)

    _resumes_exactly(fill_data, base_dir, ds, resumed, options)


def _resumes_exactly(fill_data, base_dir, ds, resumed, options) -> None:
    """`ds` stopped after step 2: its folder as it was then (the step-2 engine checkpoint), rerun: the same step-3
    loss and final weights."""
    shutil.copytree(ds, resumed, ignore=shutil.ignore_patterns("step-0000003", "final", "report.html"))
    assert (resumed / "checkpoints" / "step-0000002" / "deepspeed").is_dir()
    metrics = resumed / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    lines = [{**x, "before_stop": True} for x in lines if x["step"] <= 2]
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    print(f"resumed run {' '.join(options)} (1 step): {_launch(fill_data, base_dir, resumed, *options):.1f} s")
    again = _losses(resumed)
    assert len(again) == STEPS  # steps 1-2 kept from before the stop, step 3 trained after the resume
    logged = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [x["step"] for x in logged if "loss" in x and not x.get("before_stop")] == [3]
    torch.testing.assert_close(torch.tensor(again), torch.tensor(_losses(ds)), rtol=1e-6, atol=1e-7)
    # the weights after step 3's update: the optimizer state (Adam's moments, the fp32 masters) was resumed too
    torch.testing.assert_close(final_weights(resumed), final_weights(ds), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_bf16_zero3_is_close_to_bf16_ddp_exports_fp32_masters_and_resumes_exactly(fill_data, base_dir, tmp_path):
    """DeepSpeed's bf16 engine holds bf16 weights (DDP's bf16 is autocast over fp32 ones): close, not equal."""
    _need_deepspeed()
    ddp, ds, resumed = tmp_path / "ddp", tmp_path / "ds", tmp_path / "resumed"
    bf16 = ("--train.mixed_precision", "bf16")
    options = (*bf16, "--train.distributed", "deepspeed", "--train.zero_stage", "3", "--checkpoint.every", "2")
    print(f"2-process bf16 ddp run: {_launch(fill_data, base_dir, ddp, *bf16):.1f} s")
    print(f"2-process bf16 ZeRO-3 run: {_launch(fill_data, base_dir, ds, *options):.1f} s")
    one, two = _losses(ddp), _losses(ds)
    assert len(one) == len(two) == STEPS
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-2, atol=1e-3)
    a, b = final_weights(ddp), final_weights(ds)
    assert a.keys() == b.keys()
    for k in a:  # fp32 masters, not the engine's bf16 copy; within AdamW's bound of 1 lr per step (+ rounding)
        assert b[k].dtype == torch.float32, k
        assert (b[k] - a[k]).abs().max() <= 2 * LR * STEPS, k
    _resumes_exactly(fill_data, base_dir, ds, resumed, options)


@pytest.mark.parametrize(
    "option, value",
    [
        ("optim.ema_decay", "0.999"),
        ("model.architecture", "lite"),
        ("model.sd_locked", "false"),
        ("validation.every", "2"),
        ("train.mixed_precision", "fp16"),
    ],
)
def test_deepspeed_refuses_in_one_line_what_it_does_not_run_yet(fill_data, tmp_path, monkeypatch, option, value):
    from controlnet.train import deepspeed_engine
    from controlnet.train.deepspeed_engine import check_deepspeed

    monkeypatch.setattr(deepspeed_engine, "installed", lambda: True)
    c = tiny_config(
        fill_data, tmp_path / "run", train__distributed="deepspeed", **{option.replace(".", "__"): value}
    )
    with pytest.raises(ValueError, match=rf"train.distributed=deepspeed.*{value if 'arch' in option else option}"):
        check_deepspeed(c, "unet")
    check_deepspeed(tiny_config(fill_data, tmp_path / "run", **{option.replace(".", "__"): value}), "unet")  # ddp
    with pytest.raises(ValueError, match="train.distributed=deepspeed: a flux base"):
        check_deepspeed(tiny_config(fill_data, tmp_path / "run", train__distributed="deepspeed"), "flux")


def test_deepspeed_missing_is_refused_in_one_line_before_the_run_folder(fill_data, tmp_path, monkeypatch):
    from train_tiny import make_tiny_base

    from controlnet.train import deepspeed_engine
    from controlnet.train.trainer import Trainer

    with pytest.raises(ValueError, match="train.zero_stage=1: expected one of 2, 3"):
        tiny_config(fill_data, tmp_path / "run", train__distributed="deepspeed", train__zero_stage="1")
    monkeypatch.setattr(deepspeed_engine, "installed", lambda: False)
    c = tiny_config(fill_data, tmp_path / "run", train__distributed="deepspeed", train__cpu="true")
    with pytest.raises(
        ValueError, match=r"^train.distributed=deepspeed: deepspeed is not installed \(pip install"
    ):
        Trainer(c, make_tiny_base()).setup()
    assert not (tmp_path / "run").exists()


def test_deepspeed_needs_several_processes(fill_data, tmp_path):
    _need_deepspeed()
    from train_tiny import make_tiny_base

    from controlnet.train.trainer import Trainer

    c = tiny_config(fill_data, tmp_path / "run", train__distributed="deepspeed", train__cpu="true")
    with pytest.raises(ValueError, match=r"deepspeed: needs `accelerate launch --multi_gpu --num_processes N`"):
        Trainer(c, make_tiny_base()).setup()
    assert not (tmp_path / "run").exists()


def test_a_deepspeed_run_refuses_a_ddp_checkpoint(tmp_path):
    from controlnet.train.checkpoint import STATE_FILE
    from controlnet.train.deepspeed_engine import load

    (tmp_path / "step-0000002").mkdir()
    (tmp_path / "step-0000002" / STATE_FILE).write_text("{}")
    with pytest.raises(ValueError, match="resume it with --train.distributed ddp"):
        load(tmp_path / "step-0000002", None, None, 2)
    (tmp_path / "step-0000002" / "deepspeed").mkdir()
    (tmp_path / "step-0000002" / STATE_FILE).write_text('{"world_size": 4}')
    with pytest.raises(ValueError, match="written by 4 processes, resuming with 2"):
        load(tmp_path / "step-0000002", None, None, 2)
