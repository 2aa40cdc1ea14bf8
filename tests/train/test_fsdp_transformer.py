"""`--train.distributed fsdp` (FSDP2, train/sharding.py) on tiny random SD3 and Flux bases with 2 real CPU processes
(gloo, `accelerate launch`): the same losses and export as DDP, half the trainable bytes per process, an exact resume
from the sharded checkpoint, and the options: the locked base sharded (half its bytes per process), CPU offload and
activation checkpointing, each giving DDP's losses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import _losses
from test_fsdp import _base_bytes, _close_to_ddp, _param_bytes
from train_helpers import final_weights
from train_tiny import make_fill_dataset

from controlnet.testing.launch import accelerate_launch
from controlnet.testing.tiny_transformer_bases import write_flux_base, write_sd3_base
from controlnet.train.config import resolve_config

SIZE = 8  # px; the tiny bases' VAE has factor 1: an 8x8 latent (SD3 64 tokens, Flux 16 packed tokens)
STEPS = 3  # as test_fsdp's, whose _close_to_ddp bounds a weight's drift by 2 lr per step
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-transformer")
    return {
        "root": root,
        "data": make_fill_dataset(root / "fill", n=8),
        "sd3": write_sd3_base(root / "sd3" / "base"),
        "flux": write_flux_base(root / "flux" / "base"),
    }


def _args(world: dict, arch: str, out: Path) -> list[str]:
    """3 steps of a ControlNet of 2 copied blocks (Flux: + 1 single block) of the 4-block base, 2 samples a process."""
    flux = ["--model.transformer_single_layers", "1"] if arch == "flux" else []
    return [
        "train",
        "--model.base",
        str(world[arch]),
        "--model.transformer_layers",
        "2",
        *flux,
        "--data.path",
        str(world["data"]),
        "--data.resolution",
        str(SIZE),
        "--train.output_dir",
        str(out),
        "--train.max_steps",
        str(STEPS),
        "--train.batch_size",
        "2",
        "--train.log_every",
        "1",
        "--optim.lr",
        "1e-3",
        "--checkpoint.every",
        "0",
        "--validation.every",
        "0",
        "--quiet",
    ]


def _launch(world: dict, arch: str, out: Path, *extra: str) -> float:
    """One 2-process run (global batch 4); its wall time."""
    start = time.time()
    cmd = [*accelerate_launch(2), *_args(world, arch, out), *extra]
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return time.time() - start


@pytest.fixture(scope="module")
def ddp(world):
    """The DDP run of each base (made once, on first use): the reference of every FSDP run here."""
    runs = {}

    def run(arch: str) -> Path:
        if arch not in runs:
            out = world["root"] / f"ddp-{arch}"
            print(f"{arch} ddp run: {_launch(world, arch, out):.1f} s")
            runs[arch] = out
        return runs[arch]

    return run


def _matches_ddp(ddp_run: Path, run: Path) -> None:
    """The same losses for the same seeds and global batch, and the export (gathered on rank 0) in the same files
    with nearly the same weights (test_fsdp's tolerance: gradients summed in another order)."""
    one, two = _losses(ddp_run), _losses(run)
    assert len(one) == len(two) == STEPS
    print(f"losses ddp {one}, fsdp {two}")
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-6)
    files = sorted(p.relative_to(ddp_run / "final") for p in (ddp_run / "final").rglob("*"))
    assert files == sorted(p.relative_to(run / "final") for p in (run / "final").rglob("*"))
    _close_to_ddp(final_weights(ddp_run), final_weights(run))
    _close_to_ddp(
        load_file(ddp_run / "final" / "controlnet.safetensors"),
        load_file(run / "final" / "controlnet.safetensors"),
    )


def _optimizer_bytes(run: Path) -> list[int]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return next(x["optimizer_state_bytes"] for x in lines if x.get("event") == "optimizer_memory")


def _halved(reference: list[int], sharded: list[int]) -> bool:
    return reference[0] == reference[1] and all(0.45 * reference[0] <= b <= 0.55 * reference[0] for b in sharded)


@pytest.mark.slow
def test_fsdp_trains_an_sd3_controlnet_as_ddp_does_and_resumes_exactly(world, ddp, tmp_path):
    fsdp, resumed = tmp_path / "fsdp", tmp_path / "resumed"
    reference = ddp("sd3")
    t_fsdp = _launch(world, "sd3", fsdp, "--train.distributed", "fsdp", "--checkpoint.every", "2")
    print(f"sd3 fsdp run: {t_fsdp:.1f} s")
    _matches_ddp(reference, fsdp)

    # per-process bytes of trainable weights: DDP holds the whole net on each rank, FSDP about half of it; the locked
    # base stays replicated by default
    b_ddp, b_fsdp = _param_bytes(reference), _param_bytes(fsdp)
    o_ddp, o_fsdp = _optimizer_bytes(reference), _optimizer_bytes(fsdp)
    print(
        f"sd3 bytes per rank: trainable parameters ddp {b_ddp}, fsdp {b_fsdp}; Adam state ddp {o_ddp}, fsdp {o_fsdp}"
    )
    assert _halved(b_ddp, b_fsdp) and _halved(o_ddp, o_fsdp)
    assert _base_bytes(fsdp) == _base_bytes(reference)

    # the run stopped after step 2: its folder as it was then (the step-2 sharded checkpoint), rerun
    shutil.copytree(fsdp, resumed, ignore=shutil.ignore_patterns("step-0000003", "final", "report.html"))
    assert (resumed / "checkpoints" / "step-0000002" / "sharded").is_dir()
    metrics = resumed / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({**x, "before_stop": True}) + "\n" for x in lines if x["step"] <= 2))
    t_resume = _launch(world, "sd3", resumed, "--train.distributed", "fsdp", "--checkpoint.every", "2")
    print(f"sd3 resumed fsdp run (1 step): {t_resume:.1f} s")
    logged = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [x["step"] for x in logged if "loss" in x and not x.get("before_stop")] == [3]  # only step 3 trained
    torch.testing.assert_close(torch.tensor(_losses(resumed)), torch.tensor(_losses(fsdp)), rtol=1e-6, atol=1e-7)
    # the weights after step 3's update: Adam's moments were resumed too
    torch.testing.assert_close(final_weights(resumed), final_weights(fsdp), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, options",
    [
        ("flux", ["--model.gradient_checkpointing", "true"]),
        ("sd3", ["--train.fsdp_cpu_offload", "true"]),
    ],
)
def test_a_sharded_base_gives_ddps_losses_with_half_its_bytes_per_process(world, ddp, tmp_path, arch, options):
    """The locked base sharded too (train.fsdp_shard_base), with activation checkpointing (Flux) or CPU offload of
    the shards and Adam's state (SD3): each block all-gathered for its forward, its recomputation and backward."""
    run = tmp_path / "fsdp"
    reference = ddp(arch)
    extra = ["--train.distributed", "fsdp", "--train.fsdp_shard_base", "true", *options]
    print(f"{arch} fsdp run with {' '.join(extra[2:])}: {_launch(world, arch, run, *extra):.1f} s")
    _matches_ddp(reference, run)
    b_ddp, b_fsdp = _base_bytes(reference), _base_bytes(run)
    t_ddp, t_fsdp = _param_bytes(reference), _param_bytes(run)
    print(f"{arch} bytes per rank: base ddp {b_ddp}, fsdp {b_fsdp}; trainable ddp {t_ddp}, fsdp {t_fsdp}")
    assert _halved(b_ddp, b_fsdp) and _halved(t_ddp, t_fsdp)


# ---------------------------------------------------------------------------------------------------------------
# what is refused, in one line, before any weights load
def _config(world: dict, arch: str, out: Path, **overrides):
    values = {
        "model.base": str(world[arch]),
        "data.path": str(world["data"]),
        "data.resolution": str(SIZE),
        "train.output_dir": str(out),
        "validation.every": "0",
    }
    values.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
    return resolve_config(None, values)


def test_sd_locked_false_under_fsdp_is_refused_before_the_base_is_read(world, tmp_path):
    from controlnet.train.trainer import Trainer

    c = _config(world, "flux", tmp_path / "run", train__distributed="fsdp", model__sd_locked="false")
    with pytest.raises(
        ValueError, match=r"train.distributed=fsdp with model.sd_locked=false: .*sd_locked=true"
    ) as e:
        Trainer(c).setup()
    assert "\n" not in str(e.value) and "too large to replicate" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_fsdp_options_need_fsdp(world, tmp_path):
    from controlnet.train.sharding import check_fsdp

    for option in ("fsdp_shard_base", "fsdp_cpu_offload"):
        with pytest.raises(ValueError, match=rf"train.{option}=true: an FSDP2 option.*distributed=ddp"):
            _config(world, "sd3", tmp_path / "run", **{f"train__{option}": "true"})
    c = _config(world, "sd3", tmp_path / "run", train__distributed="fsdp", train__fsdp_shard_base="true")
    check_fsdp(c, "sd3")
    check_fsdp(c, "flux")
    check_fsdp(c, "unet")  # a UNet base is sharded too (test_fsdp.py)
