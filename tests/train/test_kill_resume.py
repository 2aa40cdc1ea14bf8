"""Crash safety with real processes: SIGKILL at random steps, 10 times, then resume = one uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import final_weights
from train_tiny import TINY_SIZE

from controlnet.train.checkpoint import list_checkpoints, load_checkpoint

ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
MAX_STEPS = 30
KILLS = 10


def _cmd(fill_data, base_dir, out: Path, max_steps: int = MAX_STEPS) -> list[str]:
    return [
        sys.executable,
        "-m",
        "controlnet.cli",
        "train",
        "--model.base",
        str(base_dir),
        "--model.hint_channels",
        "8,16",
        "--data.path",
        str(fill_data),
        "--data.resolution",
        str(TINY_SIZE),
        "--train.output_dir",
        str(out),
        "--train.max_steps",
        str(max_steps),
        "--train.batch_size",
        "2",
        "--train.log_every",
        "1",
        "--optim.lr",
        "1e-3",
        "--optim.ema_decay",
        "0.9",
        "--optim.grad_accum",
        "2",
        "--checkpoint.every",
        "1",
        "--checkpoint.keep",
        "2",
        "--quiet",
    ]


def _logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip().endswith("}")]
    return max(steps, default=0)


def _check_checkpoints(run: Path) -> None:
    for folder in list_checkpoints(run):  # every checkpoint that exists is complete and finite
        data = load_checkpoint(folder)
        assert data.state["step"] == int(folder.name.split("-")[1])
        assert all(torch.isfinite(v).all() for v in data.weights["controlnet"].values())


@pytest.mark.slow
def test_sigkill_at_random_steps_ten_times_then_resume_equals_uninterrupted(fill_data, base_dir, tmp_path):
    done = subprocess.run(
        _cmd(fill_data, base_dir, tmp_path / "straight"), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rng = random.Random(0)
    run = tmp_path / "killed"
    kill_steps = []
    for _ in range(KILLS):
        start_step = _logged_step(run)
        target = start_step + rng.randint(0, 3)
        proc = subprocess.Popen(
            _cmd(fill_data, base_dir, run), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 120
        while proc.poll() is None and _logged_step(run) < target and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.random() * 0.15)  # anywhere inside a step or a checkpoint write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kill_steps.append(_logged_step(run))
        _check_checkpoints(run)
    print("killed after logged steps", kill_steps)
    assert kill_steps[-1] < MAX_STEPS  # the kills really interrupted training
    last = subprocess.run(_cmd(fill_data, base_dir, run), env=ENV, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-3000:]
    a, b = final_weights(tmp_path / "straight"), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".partial")]
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses.setdefault(record["step"], record["loss"])
    straight = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [losses[r["step"]] for r in straight] == [r["loss"] for r in straight]  # the same losses, step by step


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(fill_data, base_dir, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(fill_data, base_dir, run, max_steps=100000)[:-1] + ["--checkpoint.every", "0"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while _logged_step(run) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted at step" in out
    stopped = int(out.split("interrupted at step ")[1].split()[0])
    assert [p.name for p in list_checkpoints(run)] == [f"step-{stopped:07d}"]
    resumed = subprocess.run(
        _cmd(fill_data, base_dir, run, max_steps=stopped + 2), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0 and f"finished at step {stopped + 2}" in resumed.stdout
