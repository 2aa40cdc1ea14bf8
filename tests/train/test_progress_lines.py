"""`controlnet train`'s waits are named (phase lines, controlnet/progress.py) and its step bar counts only steps.

The real CLI in a subprocess, on the tiny base: with -v every phase line appears in stderr, in the order the run
goes through them; the step bar closes at the last step (the checkpoint and export after it do not re-render it),
and after a resume its total and time per step count only the steps this process ran.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from train_tiny import TINY_SIZE


def _train(base_dir, data, run, steps: int, *extra: str):
    args = [
        "train",
        "--model.base",
        base_dir,
        "--data.path",
        data,
        "--data.resolution",
        TINY_SIZE,
        "--train.output_dir",
        run,
        "--train.batch_size",
        2,
        "--train.threads",
        1,
        "--model.hint_channels",
        "8,16",
        "--checkpoint.every",
        1,
        "--train.max_steps",
        steps,
    ]
    return subprocess.run(
        [sys.executable, "-m", "controlnet.cli", *extra, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _renders(stderr: str) -> list[str]:
    """Every line and every bar render (tqdm redraws with a carriage return), in order."""
    return [part.strip() for part in re.split(r"[\r\n]+", stderr) if part.strip()]


def _index(lines: list[str], start: str) -> int:
    found = [k for k, line in enumerate(lines) if line.startswith(start)]
    assert found, f"no line starting with {start!r} in:\n" + "\n".join(lines)
    return found[0]


@pytest.mark.slow  # the default suite's 15-minute budget (the clean-clone run took 906 s); -m slow
def test_train_names_its_phases_in_order_and_a_resumed_bar_counts_this_runs_steps(base_dir, fill_data, tmp_path):
    run = tmp_path / "run"
    first = _train(base_dir, fill_data, run, 2, "-v")
    assert first.returncode == 0, first.stderr[-3000:]
    lines = _renders(first.stderr)
    order = [
        "checking the training data ...",
        "hashing the VAE and text encoder weights (cache keys) ...",
        "caching the text embeddings of",
        "caching the VAE latents of",
        "building the trainable ControlNet ...",
        "saving the checkpoint of step 1 ...",
        "saving the checkpoint of step 2 ...",
        f"exporting the trained ControlNet to {run / 'final'} ...",
    ]
    at = [_index(lines, line) for line in order]
    assert at == sorted(at), lines
    # -v: each phase's time when it ends
    assert any(re.match(r"building the trainable ControlNet: done in \d+\.\d s", line) for line in lines), lines
    # the bar's last render is 2/2, before the last checkpoint: nothing re-renders it afterwards
    bars = [k for k, line in enumerate(lines) if re.search(r"\| \d+/2\b", line)]
    assert lines[bars[-1]].split("|")[2].startswith(" 2/2"), lines[bars[-1]]
    assert bars[-1] < at[-2], lines

    # resumed for one more step: the bar starts at 2/3 and its time per step is that one step's
    again = _train(base_dir, fill_data, run, 3)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = _renders(again.stderr)
    last = [line for line in lines if re.search(r"\| 3/3\b", line)]
    assert last, lines
    per_step = float(re.search(r"s/step=(\d+\.\d+)", last[-1])[1])
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["step"] == 3
    step_s = 2 / record["samples_per_s"]  # batch 2: the trainer's own timing of its one step (+ logging)
    assert per_step <= step_s * 1.1 + 0.01, (per_step, step_s, last[-1])  # not one step's time over 3 steps
    assert per_step >= step_s * 0.5 - 0.01, (per_step, step_s, last[-1])
    assert "left=0:00" in last[-1]
    # without -v and a terminal, no phase lines: a log keeps to the bar and the summary
    assert not any(line.endswith(" ...") for line in lines), lines
