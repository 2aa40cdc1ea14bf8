"""Manifest sharding: `accelerate launch` with 2 real CPU processes (gloo) = one process, no line done twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from controlnet.generate.manifest import ManifestLine, shard
from controlnet.testing.launch import accelerate_launch

N_LINES = 5


def test_shards_are_disjoint_and_cover_everything():
    jobs = [ManifestLine(k, f"j{k}", "p", [], None, {}) for k in range(7)]
    parts = [shard(jobs, r, 3) for r in range(3)]
    numbers = sorted(j.number for part in parts for j in part)
    assert numbers == list(range(7))
    assert [j.number for j in parts[1]] == [1, 4]
    with pytest.raises(ValueError, match="rank=3 world=3"):
        shard(jobs, 3, 3)


@pytest.mark.slow
def test_two_processes_equal_one(saved, tmp_path):
    manifest = tmp_path / "jobs.jsonl"
    conds = [str(saved / "cond1.png"), str(saved / "cond2.png")]
    manifest.write_text(
        "\n".join(json.dumps({"prompt": f"a cat {k}", "cond": conds[k % 2]}) for k in range(N_LINES))
    )
    common = [
        "--base",
        str(saved / "base"),
        "--controlnet",
        str(saved / "cn_diffusers"),
        "--steps",
        "2",
        "--manifest",
        str(manifest),
        "--no-grid",
        "--seed",
        "5",
    ]
    # both runs in subprocesses with one thread each, so float summation order (and so every pixel) is the same
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    single_cmd = [sys.executable, "-m", "controlnet.cli", "generate", *common, "--out", str(tmp_path / "single")]
    proc = subprocess.run(single_cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "process 1/1: generated 5, skipped 0" in proc.stdout
    cmd = [
        *accelerate_launch(2),
        "generate",
        *common,
        "--out",
        str(tmp_path / "multi"),
    ]
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    print(f"2-process run: {time.time() - start:.1f} s")
    assert "process 1/2: generated 3, skipped 0 (already done) of 5 lines" in proc.stdout
    assert "process 2/2: generated 2, skipped 0 (already done) of 5 lines" in proc.stdout
    single = sorted(p.name for p in (tmp_path / "single").iterdir())
    multi = sorted(p.name for p in (tmp_path / "multi").iterdir())
    assert single == multi and len([n for n in multi if n.endswith(".png")]) == N_LINES
    owners = {}
    for k in range(N_LINES):
        stem = f"line-{k:06d}"
        record = json.loads((tmp_path / "multi" / f"{stem}.json").read_text())
        owners[k] = record["process"]
        a = np.asarray(Image.open(tmp_path / "single" / f"{stem}.png"))
        b = np.asarray(Image.open(tmp_path / "multi" / f"{stem}.png"))
        assert np.array_equal(a, b), stem
        single_record = json.loads((tmp_path / "single" / f"{stem}.json").read_text())
        assert single_record["settings"] == record["settings"]
    assert owners == {0: 0, 1: 1, 2: 0, 3: 1, 4: 0}  # each line written by exactly its shard's process
