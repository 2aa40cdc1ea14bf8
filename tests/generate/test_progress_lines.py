"""`controlnet generate` names its waits between the loading bar and the steps, and after them (phase lines,
controlnet/progress.py): the ControlNet's load, packing the weights for the CPU, the decode, the saving."""

from __future__ import annotations

import logging
import os
import pty
import re
import subprocess
import sys

import pytest
from PIL import Image

from controlnet import progress
from controlnet.generate import cpu_packing
from controlnet.generate.pipeline import MIN_PACKING_STEPS
from controlnet.testing.tiny_models import condition_image

PHASES = ["loading ControlNet canny (1/1) ...", "decoding 1 image ...", "saving 1 image to"]


def _command(tmp_path, *flags: str) -> list[str]:
    Image.new("RGB", (64, 64), "white").save(tmp_path / "cond.png")
    return [
        sys.executable,
        "-m",
        "controlnet.cli",
        *flags,
        "generate",
        "a red circle",
        "--controlnet",
        "builtin:canny",
        "--cond",
        str(tmp_path / "cond.png"),
        "--steps",
        "2",
        "--out",
        str(tmp_path / "out"),
    ]


def _in_order(lines: list[str], starts: list[str]) -> list[int]:
    at = []
    for start in starts:
        found = [k for k, line in enumerate(lines) if line.startswith(start)]
        assert found, f"no line starting with {start!r} in:\n" + "\n".join(lines)
        at.append(found[0])
    assert at == sorted(at), lines
    return at


def test_generate_prints_phase_lines_in_order_with_v_and_their_times(tmp_path):
    run = subprocess.run(_command(tmp_path, "-v"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [part.strip() for part in re.split(r"[\r\n]+", run.stderr) if part.strip()]
    at = _in_order(lines, PHASES)
    step_bar = [k for k, line in enumerate(lines) if re.search(r"\| 2/2\b", line)]
    assert at[0] < step_bar[0] and step_bar[-1] < at[1], lines  # the load before the steps, the decode after
    for phase in ("loading ControlNet canny (1/1)", "decoding 1 image"):
        assert any(re.match(rf"{re.escape(phase)}: done in \d+\.\d s", line) for line in lines), lines


@pytest.mark.slow  # 11 s (a subprocess on a pty; the -v test beside it covers the phases): 15-minute budget
def test_generate_prints_phase_lines_on_a_terminal_without_v(tmp_path):
    """stderr a terminal (a pseudo-terminal here): the phase lines appear without -v; their times do not."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(_command(tmp_path), stdout=subprocess.DEVNULL, stderr=follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the process closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=300) == 0
    finally:
        os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    lines = [part.strip() for part in re.split(r"[\r\n]+", text) if part.strip()]
    _in_order(lines, PHASES)
    assert not any("done in" in line for line in lines), lines


def test_packing_is_a_phase_of_its_own_before_the_first_step(sd_pipe, monkeypatch):
    """Packing happens during step 1 (as each layer meets its input): its phase ends before the first step is
    reported, and is named only while some layer is still to pack (a second generation reuses the packs)."""
    monkeypatch.setattr(cpu_packing, "MIN_CONV_WEIGHTS", 1)  # the tiny model's layers count as SD-sized ones
    monkeypatch.setattr(cpu_packing, "MIN_LINEAR_WEIGHTS", 1)
    events: list[str] = []

    class Record(logging.Handler):
        def emit(self, record):
            events.append(f"{record.phase_event} {record.phase_name}")

    handler = Record()
    logger = logging.getLogger(progress.LOGGER_NAME)
    logger.addHandler(handler)
    level, logger_level = logger.level, logging.DEBUG
    logger.setLevel(logger_level)
    try:
        for call in range(2):
            events.append(f"call {call}")
            conds = [condition_image(1), condition_image(2)]  # one per net of the fixture
            sd_pipe(
                "a cat", conds, steps=MIN_PACKING_STEPS, seed=0, progress=lambda k, n: events.append(f"step {k}")
            )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        cpu_packing.release_packed(sd_pipe.unet, *sd_pipe.controlnets)  # the fixture's models are shared
    packing = "packing the weights for the CPU (during step 1)"
    first = events[: events.index("call 1")]
    assert first[1:4] == [f"start {packing}", f"end {packing}", "step 1"], events
    assert f"start {packing}" not in events[events.index("call 1") :], events
    assert events[-2:] == ["start decoding 1 image", "end decoding 1 image"], events
