"""Validation and EMA under `--train.distributed fsdp` (train/sharded_validation.py), 2 real CPU processes (gloo,
`accelerate launch`): the same floor, ceiling, fidelity and sample images as a DDP run of the same training, each
rank generating its share of the held-out samples with the sharded net; the EMA sharded like the net, its export
equal to DDP's, and an exact resume of it from the sharded checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_distributed import _losses
from test_fsdp import _close_to_ddp, _launch
from train_helpers import final_weights
from train_tiny import TINY_SIZE

# 5 held-out samples on 2 ranks: rank 0 generates 3, rank 1 2 and a padding image (dropped)
VALIDATION = ("--validation.every", "2", "--validation.num_samples", "5", "--validation.steps", "2")
FSDP = ("--train.distributed", "fsdp")
EMA_DECAY = "0.5"  # far from 1, so that after 3 steps the average differs from both the first and the last weights


def _events(run, event: str) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("event") == event]


def _same_validation(ddp, fsdp, size: int = TINY_SIZE) -> None:
    """The floor and ceiling (no trained weights) exactly, the fidelity within a metric's jitter, images nearly."""
    (a,), (b,) = _events(ddp, "floor_ceiling"), _events(fsdp, "floor_ceiling")
    assert (a["floor"], a["ceiling"], a["metric"]) == (b["floor"], b["ceiling"], b["metric"]), (a, b)
    one, two = _events(ddp, "validation"), _events(fsdp, "validation")
    assert [x["step"] for x in one] == [x["step"] for x in two] == [2, 3]  # every 2 steps and the exported weights
    print("fidelity ddp", [x["fidelity"] for x in one], "fsdp", [x["fidelity"] for x in two])
    for x, y in zip(one, two, strict=True):
        assert abs(x["fidelity"] - y["fidelity"]) <= 0.02, (x, y)
    for name in ("reference.png", "step-0000002.png", "step-0000003.png"):
        p, q = (np.asarray(Image.open(run / "samples" / name), dtype=np.int16) for run in (ddp, fsdp))
        assert p.shape == q.shape, name
        diff = np.abs(p - q)
        print(f"{name}: max |ddp - fsdp| {diff.max()}, mean {diff.mean():.4f}")
        assert diff.max() <= 2 and diff.mean() <= 0.05, name
    # the comparison sees the trained net: its images are not the floor's (the base alone: reference.png's last row)
    floor = np.asarray(Image.open(fsdp / "samples" / "reference.png"), dtype=np.int16)[-size:]
    trained = np.asarray(Image.open(fsdp / "samples" / "step-0000003.png"), dtype=np.int16)
    assert np.abs(floor - trained).max() >= 8


@pytest.mark.slow
def test_fsdp_validation_on_every_rank_matches_ddp(fill_data, base_dir, tmp_path):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    t_ddp = _launch(fill_data, base_dir, ddp, *VALIDATION)
    t_fsdp = _launch(fill_data, base_dir, fsdp, *VALIDATION, *FSDP)
    print(f"2-process runs validating every 2 steps: ddp {t_ddp:.1f} s, fsdp {t_fsdp:.1f} s")
    # validation changes no weight: the training after it is DDP's
    torch.testing.assert_close(torch.tensor(_losses(fsdp)), torch.tensor(_losses(ddp)), rtol=1e-4, atol=1e-6)
    _same_validation(ddp, fsdp)


@pytest.mark.slow
def test_fsdp_ema_is_sharded_exports_as_ddp_and_resumes_exactly(fill_data, base_dir, tmp_path):
    import torch.distributed.checkpoint as dcp

    ddp, fsdp, resumed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "resumed"
    ema = ("--optim.ema_decay", EMA_DECAY, *VALIDATION)  # validation swaps the EMA in and out of the shards
    t_ddp = _launch(fill_data, base_dir, ddp, *ema)
    t_fsdp = _launch(fill_data, base_dir, fsdp, *ema, *FSDP, "--checkpoint.every", "2")
    print(f"2-process runs with EMA: ddp {t_ddp:.1f} s, fsdp {t_fsdp:.1f} s")

    # the training after a validation of the EMA weights is DDP's: the trained weights came back into the shards
    torch.testing.assert_close(torch.tensor(_losses(fsdp)), torch.tensor(_losses(ddp)), rtol=1e-4, atol=1e-6)
    _same_validation(ddp, fsdp)
    # the export is the EMA, gathered from the shards, equal to DDP's EMA export (the last weights differ from it by
    # ~lr in most weights: _close_to_ddp would fail on them)
    _close_to_ddp(final_weights(ddp), final_weights(fsdp))

    # the checkpoint holds the EMA as shards: each rank wrote its half of every tensor split across ranks
    meta = dcp.FileSystemReader(str(fsdp / "checkpoints" / "step-0000003" / "sharded")).read_metadata()
    ema_keys = [k for k in meta.state_dict_metadata if k.startswith("ema.")]
    assert len(ema_keys) == len([k for k in meta.state_dict_metadata if k.startswith("model.")])
    assert max(len(meta.state_dict_metadata[k].chunks) for k in ema_keys) == 2

    # stopped after step 2: rerun from its sharded checkpoint; the EMA (and so the export) as without the stop
    shutil.copytree(fsdp, resumed, ignore=shutil.ignore_patterns("step-0000003", "final", "report.html"))
    metrics = resumed / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines if x["step"] <= 2))
    t_resume = _launch(fill_data, base_dir, resumed, *ema, *FSDP, "--checkpoint.every", "2")
    print(f"resumed fsdp run with EMA (1 step): {t_resume:.1f} s")
    torch.testing.assert_close(torch.tensor(_losses(resumed)), torch.tensor(_losses(fsdp)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(final_weights(resumed), final_weights(fsdp), rtol=1e-6, atol=1e-7)
    assert _events(resumed, "validation")[-1]["fidelity"] == _events(fsdp, "validation")[-1]["fidelity"]


def test_rank_shares_cover_each_set_once_and_every_rank_makes_the_same_calls():
    from controlnet.train.sharded_validation import rank_share
    from controlnet.train.validation import HeldOut

    for n, world in [(5, 2), (3, 8), (8, 8), (1, 2)]:
        held = HeldOut([f"p{i}" for i in range(n)], list(range(n)), list(range(10, 10 + n)))
        shares = [rank_share(held, world, r) for r in range(world)]
        assert {len(s.padded.prompts) for s in shares} == {-(-n // world)}  # the same number of images everywhere
        kept = [p for s in shares for p in s.padded.prompts[: s.count]]
        assert kept == held.prompts  # each sample once, in order: rank 0 writes them as one process would
        for s in shares:  # a share's image k is sample start + k (its seed)
            assert s.padded.conditions[: s.count] == list(range(s.start, s.start + s.count))
            assert s.padded.targets[: s.count] == [10 + i for i in range(s.start, s.start + s.count)]


@pytest.mark.slow
def test_a_sharded_net_can_be_validated_before_any_training_step():
    """FSDP2 makes a root of the first group that runs: without `reshard`'s root set-up the net's call after the
    pipeline's `embed_condition` fails ('FSDP requires running forward through the root module first')."""
    import torch.multiprocessing as mp
    from fsdp_workers import net_called_first_in_validation

    from controlnet.testing.live_server import free_port

    # the worker lives in a module the spawned processes can import by name (tests/train is on their
    # sys.path; this module is not importable as pytest's importlib mode names it)
    mp.spawn(net_called_first_in_validation, args=(free_port(),), nprocs=2)


@pytest.mark.slow
def test_fsdp_validation_of_a_flux_controlnet_on_a_sharded_base_matches_ddp(tmp_path):
    """The Flux case sharding is for: the locked base sharded too (train.fsdp_shard_base), so that every denoising
    step of validation, the floor's included (the net at scale 0), needs every rank."""
    from test_fsdp_transformer import SIZE, _launch
    from train_tiny import make_fill_dataset

    from controlnet.testing.tiny_transformer_bases import write_flux_base

    world = {
        "data": make_fill_dataset(tmp_path / "fill", n=8),
        "flux": write_flux_base(tmp_path / "flux" / "base"),
    }
    validation = (*VALIDATION[:3], "3", *VALIDATION[4:])  # 3 of the 8 samples held out
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    t_ddp = _launch(world, "flux", ddp, *validation)
    t_fsdp = _launch(world, "flux", fsdp, *validation, *FSDP, "--train.fsdp_shard_base", "true")
    print(f"2-process Flux runs validating every 2 steps: ddp {t_ddp:.1f} s, fsdp {t_fsdp:.1f} s")
    torch.testing.assert_close(torch.tensor(_losses(fsdp)), torch.tensor(_losses(ddp)), rtol=1e-4, atol=1e-6)
    _same_validation(ddp, fsdp, SIZE)
