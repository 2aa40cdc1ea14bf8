"""Checkpoint folders: written atomically, re-saved whole, pruned to the newest `keep`, leftovers swept."""

import torch

from controlnet.train.checkpoint import (
    CHECKPOINT_DIR,
    PARTIAL_PREFIX,
    CheckpointData,
    list_checkpoints,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
)


def _data(step: int, value: float) -> CheckpointData:
    return CheckpointData({"controlnet": {"w": torch.full((2,), value)}}, {"o": 1}, {"s": 2}, {"step": step})


def test_resaving_a_step_replaces_it_whole_and_pruning_keeps_the_newest(tmp_path):
    save_checkpoint(tmp_path, 1, _data(1, 1.0), keep=2)
    save_checkpoint(tmp_path, 2, _data(2, 2.0), keep=2)
    again = save_checkpoint(
        tmp_path, 2, CheckpointData({"ema": {"w": torch.zeros(2)}}, {}, {}, {"step": 2}), keep=2
    )
    assert sorted(p.name for p in again.iterdir()) == [
        "ema.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "state.json",
    ]
    save_checkpoint(tmp_path, 3, _data(3, 3.0), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]
    assert torch.equal(
        load_checkpoint(list_checkpoints(tmp_path)[-1]).weights["controlnet"]["w"], torch.full((2,), 3.0)
    )
    folder = tmp_path / CHECKPOINT_DIR
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000002", "step-0000003"]  # nothing hidden is left
    (folder / f"{PARTIAL_PREFIX}step-0000004-killed.tmp").mkdir()  # what a killed writer leaves
    remove_partial(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000002", "step-0000003"]
