"""`--train.distributed fsdp` (FSDP2, train/sharding.py) with 2 real CPU processes (gloo, `accelerate launch`): the same
losses and export as DDP, an exact resume from the sharded checkpoint, and half the trainable bytes per process."""

from __future__ import annotations

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


def _launch(fill_data, base_dir, out, *extra: str) -> float:
    """One 2-process run of 3 steps with a per-process batch of 2; its wall time."""
    cmd = [
        *accelerate_launch(2),
        *_args(fill_data, base_dir, out, 2),
        *extra,
    ]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    start = time.time()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return time.time() - start


def _param_bytes(run) -> list[int]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return next(x["trainable_param_bytes"] for x in lines if x.get("event") == "memory")


def _base_bytes(run) -> list[int]:
    """Each process's bytes of the locked base (UNet or transformer) from the run's memory event."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return next(x["base_param_bytes"] for x in lines if x.get("event") == "memory")


def _close_to_ddp(a: dict, b: dict) -> None:
    """As in test_distributed: gradients summed in another order flip AdamW's sign-like step for ~0 gradients."""
    assert a.keys() == b.keys()
    for k in a:
        close = torch.isclose(b[k], a[k], rtol=1e-3, atol=1e-5)
        assert close.float().mean() > 0.999, (k, (~close).sum().item())
        assert (b[k] - a[k]).abs().max() <= 2 * LR * STEPS, k


@pytest.mark.slow
def test_fsdp_matches_ddp_and_resumes_exactly_from_its_sharded_checkpoint(fill_data, base_dir, tmp_path):
    ddp, fsdp, resumed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "resumed"
    t_ddp = _launch(fill_data, base_dir, ddp)
    t_fsdp = _launch(fill_data, base_dir, fsdp, "--train.distributed", "fsdp", "--checkpoint.every", "2")
    print(f"2-process runs: ddp {t_ddp:.1f} s, fsdp {t_fsdp:.1f} s")

    # the same losses as DDP for the same seeds and global batch
    one, two = _losses(ddp), _losses(fsdp)
    assert len(one) == len(two) == STEPS
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-6)

    # the export (gathered on rank 0) holds the same files, keys and nearly the same weights as DDP's
    _close_to_ddp(final_weights(ddp), final_weights(fsdp))
    _close_to_ddp(
        load_file(ddp / "final" / "controlnet.safetensors"), load_file(fsdp / "final" / "controlnet.safetensors")
    )

    # per-process bytes of trainable weights: DDP holds the whole net on each rank, FSDP about half of it
    b_ddp, b_fsdp = _param_bytes(ddp), _param_bytes(fsdp)
    print(f"trainable parameter bytes per rank: ddp {b_ddp}, fsdp {b_fsdp}")
    assert b_ddp[0] == b_ddp[1]
    assert all(0.45 * b_ddp[0] <= b <= 0.55 * b_ddp[0] for b in b_fsdp)

    # the run stopped after step 2: its folder as it was then (the step-2 sharded checkpoint), rerun
    shutil.copytree(fsdp, resumed, ignore=shutil.ignore_patterns("step-0000003", "final", "report.html"))
    assert (resumed / "checkpoints" / "step-0000002" / "sharded").is_dir()
    # steps 1-2 marked as logged before the stop: a resume keeps those lines, a run from scratch would rewrite them
    metrics = resumed / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    lines = [{**x, "before_stop": True} for x in lines if x["step"] <= 2]
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    t_resume = _launch(fill_data, base_dir, resumed, "--train.distributed", "fsdp", "--checkpoint.every", "2")
    print(f"resumed fsdp run (1 step): {t_resume:.1f} s")
    again = _losses(resumed)
    assert len(again) == STEPS  # steps 1-2 kept from before the stop, step 3 trained after the resume
    logged = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [x["step"] for x in logged if "loss" in x and not x.get("before_stop")] == [3]
    torch.testing.assert_close(torch.tensor(again), torch.tensor(two), rtol=1e-6, atol=1e-7)
    # the weights after step 3's update: the optimizer state (Adam's moments) was resumed too
    torch.testing.assert_close(final_weights(resumed), final_weights(fsdp), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_a_sharded_unet_base_gives_ddps_losses_with_half_its_bytes_per_process(fill_data, base_dir, tmp_path):
    """train.fsdp_shard_base: the locked UNet's down, middle and up blocks sharded too, with activation checkpointing
    (each block all-gathered for its forward, its recomputation and its backward)."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    t_ddp = _launch(fill_data, base_dir, ddp)
    options = [
        "--train.distributed",
        "fsdp",
        "--train.fsdp_shard_base",
        "true",
        "--model.gradient_checkpointing",
        "true",
    ]
    t_fsdp = _launch(fill_data, base_dir, fsdp, *options)
    print(f"2-process runs: ddp {t_ddp:.1f} s, fsdp with the base sharded {t_fsdp:.1f} s")
    torch.testing.assert_close(torch.tensor(_losses(fsdp)), torch.tensor(_losses(ddp)), rtol=1e-4, atol=1e-6)
    _close_to_ddp(final_weights(ddp), final_weights(fsdp))
    b_ddp, b_fsdp = _base_bytes(ddp), _base_bytes(fsdp)
    print(f"locked UNet bytes per rank: ddp {b_ddp}, fsdp {b_fsdp}")
    assert b_ddp[0] == b_ddp[1]
    assert all(0.45 * b_ddp[0] <= b <= 0.55 * b_ddp[0] for b in b_fsdp)


@pytest.mark.parametrize(
    "option, value",
    [
        ("model.architecture", "lite"),
        ("model.sd_locked", "false"),
    ],
)
def test_fsdp_refuses_in_one_line_what_it_does_not_shard_yet(fill_data, tmp_path, option, value):
    from controlnet.train.sharding import check_fsdp

    c = tiny_config(fill_data, tmp_path / "run", train__distributed="fsdp", **{option.replace(".", "__"): value})
    with pytest.raises(
        ValueError, match=rf"train.distributed=fsdp.*{value if option == 'model.architecture' else option}"
    ):
        check_fsdp(c, "unet")
    check_fsdp(tiny_config(fill_data, tmp_path / "run", **{option.replace(".", "__"): value}), "unet")  # ddp: fine
    # transformer bases are sharded too (test_fsdp_transformer.py)
    check_fsdp(tiny_config(fill_data, tmp_path / "run", train__distributed="fsdp"), "flux")


def test_fsdp_needs_several_processes_and_the_option_is_checked(fill_data, tmp_path):
    from train_tiny import make_tiny_base

    from controlnet.train.trainer import Trainer

    with pytest.raises(ValueError, match="train.distributed"):
        tiny_config(fill_data, tmp_path / "run", train__distributed="zero3")
    c = tiny_config(fill_data, tmp_path / "run", train__distributed="fsdp", train__cpu="true")
    with pytest.raises(ValueError, match=r"needs `accelerate launch --multi_gpu --num_processes N` with N >= 2"):
        Trainer(c, make_tiny_base()).setup()
    assert not (tmp_path / "run").exists()  # refused before the run folder is written


def test_a_ddp_run_refuses_a_sharded_checkpoint(tmp_path):
    from controlnet.train.checkpoint import STATE_FILE, load_checkpoint

    (tmp_path / "step-0000002" / "sharded").mkdir(parents=True)
    (tmp_path / "step-0000002" / STATE_FILE).write_text("{}")
    with pytest.raises(ValueError, match="resume it with --train.distributed fsdp"):
        load_checkpoint(tmp_path / "step-0000002")
