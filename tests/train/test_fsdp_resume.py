"""FSDP2 (`--train.distributed fsdp`, train/sharding.py) checkpoints with real gloo processes: a 2-process checkpoint
resumed on 3 processes with `--checkpoint.reshard true` loads exactly the checkpoint's weights and trains on to the end;
a SIGKILL of every process of a launch, then the same command again, gives the uninterrupted run's losses and weights,
and a checkpoint folder half-written when the kill landed is ignored. (Without the flag, another process count is
refused in one line: tests/train/test_resume_world.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_sharded_export import ENV, assert_same_export, export, fsdp_command, fsdp_reference_run, launch
from train_helpers import final_weights

from controlnet.train.checkpoint import PARTIAL_PREFIX, list_checkpoints

STEPS = 3


@pytest.fixture(scope="module")
def fsdp_run(fill_data, base_dir, tmp_path_factory):
    """The uninterrupted 2-process run (test_sharded_export's): 3 steps, a sharded checkpoint at each."""
    return fsdp_reference_run(fill_data, base_dir, tmp_path_factory.mktemp("fsdp") / "run")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip().endswith("}")]


def _losses(run: Path) -> dict[int, float]:
    """Each step's first logged loss (a resumed run keeps the lines logged before its checkpoint)."""
    losses: dict[int, float] = {}
    for record in _metrics(run):
        if "loss" in record:
            losses.setdefault(record["step"], record["loss"])
    return losses


@pytest.mark.slow
def test_a_2_process_checkpoint_resumes_on_3_processes_with_its_weights(
    fill_data, base_dir, fsdp_run, tmp_path, capsys
):
    # the run as it was after step 2: its step-2 checkpoint (written by 2 processes), no later step, no export
    run = tmp_path / "resumed"
    shutil.copytree(fsdp_run, run, ignore=shutil.ignore_patterns("step-0000003", "final", "report.html"))
    checkpoint = run / "checkpoints" / "step-0000002"
    assert json.loads((checkpoint / "state.json").read_text())["world_size"] == 2
    code, _, err = export(capsys, checkpoint, tmp_path / "step-2")  # its weights, joined in this process
    assert code == 0, err

    # 3 processes, train.max_steps 2: they load the checkpoint, resharded 2 -> 3, train nothing and export what they
    # loaded (gathered on rank 0): the checkpoint's weights, bit for bit
    reshard = ("--checkpoint.reshard", "true")
    start = time.time()
    loaded = launch(fsdp_command(fill_data, base_dir, run, 3, *reshard, "--train.max_steps", "2"))
    with capsys.disabled():
        print(f"3-process load and export: {time.time() - start:.1f} s")
    assert "resuming from checkpoint step 2" in loaded.stderr + loaded.stdout
    assert_same_export(tmp_path / "step-2", run / "final")

    # the same command to train.max_steps 3: step 3 trained by 3 processes (global batch 6), checkpointed in 3 shards
    start = time.time()
    done = launch(fsdp_command(fill_data, base_dir, run, 3, *reshard))
    with capsys.disabled():
        print(f"3-process step 3: {time.time() - start:.1f} s")
    assert "finished at step 3" in done.stdout
    newest = list_checkpoints(run)[-1]
    assert newest.name == "step-0000003"
    assert json.loads((newest / "state.json").read_text())["world_size"] == 3
    assert len(list((newest / "sharded").glob("*.distcp"))) == 3
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3] and all(torch.isfinite(torch.tensor(list(losses.values()))))
    memory = [x for x in _metrics(run) if x.get("event") == "memory"]
    assert len(memory[-1]["trainable_param_bytes"]) == 3  # this launch's ranks, each with its third of the net
    # a 3-rank checkpoint exports, in one process, to the 3-rank gathered export
    code, _, err = export(capsys, newest, tmp_path / "step-3")
    assert code == 0, err
    assert_same_export(run / "final", tmp_path / "step-3")


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from /proc. torch's launcher starts its workers in sessions of their own
    (torch.distributed.elastic's SubprocessHandler: start_new_session=True), so a kill of the launch's process group
    alone would not reach them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_launch(proc: subprocess.Popen) -> list[int]:
    """SIGKILL the launcher and every process it started, all at once (a machine losing power); their ids."""
    pids = [proc.pid, *_descendants(proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # gone already
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    return pids


def _partials(run: Path) -> list[str]:
    folder = run / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(PARTIAL_PREFIX)) if folder.is_dir() else []


@pytest.mark.slow
def test_sigkill_of_the_whole_launch_then_the_same_command_equals_the_uninterrupted_run(
    fill_data, base_dir, fsdp_run, tmp_path
):
    run = tmp_path / "killed"
    cmd = fsdp_command(fill_data, base_dir, run)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # once step 1's checkpoint is on disk: kill while step 2's is being written (its .partial- folder exists), or
    # as soon as step 2's is complete if no poll saw it being written
    deadline, mid_write = time.time() + 500, False
    while proc.poll() is None and time.time() < deadline:
        done = list_checkpoints(run)
        if done and [p for p in _partials(run) if "step-0000002" in p]:
            mid_write = True
            break
        if len(done) >= 2:
            break
        time.sleep(0.001)
    assert proc.poll() is None, "the run ended before it was killed"
    pids = _kill_launch(proc)
    time.sleep(0.5)
    assert not [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)], "a process survived"
    complete, left = [p.name for p in list_checkpoints(run)], _partials(run)
    print(f"killed {len(pids)} processes, mid-write: {mid_write}; complete: {complete}, half-written: {left}")
    assert complete and complete[-1] in ("step-0000001", "step-0000002") and not (run / "final").exists()
    if not left:  # the kill missed the write: leave what a kill inside dcp.save leaves, a shard cut short
        newest = list_checkpoints(run)[-1]
        half = run / "checkpoints" / f"{PARTIAL_PREFIX}step-0000003-sharded"
        shutil.copytree(newest, half)
        shard = next((half / "sharded").glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
        (half / "sharded" / ".metadata").unlink()
    resumed_from = complete[-1]

    again = launch(cmd)
    assert f"resuming from checkpoint step {int(resumed_from.split('-')[1])}" in again.stderr + again.stdout
    assert "finished at step 3" in again.stdout
    assert not _partials(run)  # the half-written folder was swept, never read
    # the next step's loss, every loss, and the final weights: the uninterrupted run's
    straight, killed = _losses(fsdp_run), _losses(run)
    assert sorted(killed) == sorted(straight) == list(range(1, STEPS + 1))
    torch.testing.assert_close(
        torch.tensor([killed[s] for s in straight]), torch.tensor(list(straight.values())), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(final_weights(run), final_weights(fsdp_run), rtol=1e-6, atol=1e-7)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
