"""Resuming with another number of processes than the checkpoint's (issue 32): refused in one line before any weights
load unless checkpoint.reshard allows it (DDP, FSDP2); a DeepSpeed checkpoint never. The process count is what
`accelerate launch` puts in WORLD_SIZE, read by the preflight (train/preflight.py check_run)."""

from __future__ import annotations

import json

import pytest
from train_helpers import tiny_config
from train_tiny import make_tiny_base

from controlnet.train.checkpoint import list_checkpoints
from controlnet.train.preflight import check_resume_world, check_run
from controlnet.train.trainer import train


@pytest.fixture(scope="module")
def one_process_run(fill_data, tmp_path_factory):
    """A 2-step run of one process with a checkpoint at each step (its state says world_size 1)."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_config(fill_data, out, train__max_steps=2, checkpoint__every=1), make_tiny_base())
    return out


def test_a_resume_on_another_process_count_is_one_line_unless_resharding(fill_data, one_process_run, monkeypatch):
    newest = list_checkpoints(one_process_run)[-1]
    assert json.loads((newest / "state.json").read_text())["world_size"] == 1
    config = tiny_config(fill_data, one_process_run, train__max_steps=4, checkpoint__every=1)
    check_run(config)  # the same count: resumes
    monkeypatch.setenv("WORLD_SIZE", "2")  # as `accelerate launch --num_processes 2` sets it
    with pytest.raises(ValueError) as err:
        check_run(config)
    message = str(err.value)
    assert "written by 1 processes, this launch has 2" in message and "checkpoint.reshard true" in message
    assert "\n" not in message
    check_run(tiny_config(fill_data, one_process_run, train__max_steps=4, checkpoint__reshard="true"))
    explicit = tiny_config(fill_data, one_process_run, checkpoint__resume=str(newest))
    with pytest.raises(ValueError, match="written by 1 processes"):
        check_run(explicit)
    check_run(tiny_config(fill_data, one_process_run, checkpoint__resume="none"))  # a fresh start: no check


def test_a_checkpoint_of_another_engine_or_a_deepspeed_one_on_another_count_is_one_line(
    fill_data, one_process_run, tmp_path
):
    """Each engine's checkpoint says which it is (a sharded/ or deepspeed/ folder, else full weights): another engine
    is refused before loading, naming it; a DeepSpeed checkpoint needs its own process count even when resharding."""
    import shutil

    newest = list_checkpoints(one_process_run)[-1]
    config = tiny_config(fill_data, one_process_run, checkpoint__reshard="true")
    config.train.distributed = "fsdp"
    with pytest.raises(
        ValueError, match="a checkpoint of a train.distributed=ddp run, this run is train.distributed=fsdp"
    ):
        check_resume_world(config, newest, world=2)
    deepspeed = tmp_path / newest.name
    shutil.copytree(newest, deepspeed)
    (deepspeed / "deepspeed").mkdir()  # what train/deepspeed_engine.py writes its partitions into
    config.train.distributed = "ddp"
    with pytest.raises(ValueError, match="resume it with --train.distributed deepspeed"):
        check_resume_world(config, deepspeed, world=1)
    config.train.distributed = "deepspeed"
    with pytest.raises(ValueError, match="one partition per rank: launch 1 processes"):
        check_resume_world(config, deepspeed, world=2)
    check_resume_world(config, deepspeed, world=1)
