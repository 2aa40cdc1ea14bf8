"""benchmarks/loading.py --size tiny runs end to end in real subprocesses (so the script cannot rot): both sides
load the same single files offline, make an image and report time and peak RSS; the images agree."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "loading.py"
NUMBER = r"(\d+(?:\.\d+)?)"


@pytest.mark.slow
def test_tiny_loading_benchmark_prints_both_sides(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--size",
        "tiny",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--cache",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = done.stdout
    for side in ("ours", "theirs"):
        line = re.search(rf"^{side}: time to first image {NUMBER} s .*peak RSS {NUMBER} MB", out, re.M)
        assert line, out
        assert float(line[1]) > 0 and float(line[2]) > 100, line[0]  # a Python process with torch holds > 100 MB
    assert re.search(rf"time ratio theirs/ours: {NUMBER}x .*peak RSS ratio ours/theirs: {NUMBER}", out), out
    assert "same image" in out, out
    assert (tmp_path / "tiny" / "base.safetensors").is_file()  # the files are written once and reused
