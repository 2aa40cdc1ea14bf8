"""benchmarks/gpu.py's fsdp section: DDP and FSDP2 launched for real (`accelerate launch --multi_gpu`), each rank's
peak memory and seconds per step, the ratios FSDP2 / DDP. Its dry mode runs the same launches with 2 gloo processes
on the CPU; with fewer than 2 GPUs the section is skipped in one line, not failed."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from gpu_script_helpers import SCRIPT, load_script, positive


@pytest.mark.slow  # two 2-process launches: minutes on a loaded CPU; run with -m slow
def test_dry_fsdp_section_launches_ddp_and_fsdp_and_reports_per_rank_numbers(tmp_path):
    out = tmp_path / "result.json"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry", "--device", "cpu", "--sections", "fsdp", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(f"dry fsdp section: {time.perf_counter() - started:.1f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    number = r"\d+(?:\.\d+)?"
    line = next(x for x in done.stdout.splitlines() if x.startswith("[fsdp]"))
    assert re.search(
        rf"2 gloo processes .* peak per rank ddp {number} GB, fsdp {number} GB \(fsdp/ddp {number}; .*\) \| s/step "
        rf"ddp {number}, fsdp {number} \(fsdp/ddp {number}\) \| trainable bytes per rank ddp \d+, fsdp \d+",
        line,
    ), line
    s = json.loads(out.read_text())["sections"]["fsdp"]
    assert s["ok"] and s["processes"] == 2
    for engine in ("ddp", "fsdp"):
        r = s[engine]
        assert len(r["peak_gb_per_rank"]) == len(r["step_s_per_rank"]) == 2
        assert all(positive(v) for v in (*r["peak_gb_per_rank"], *r["step_s_per_rank"]))
        assert len(r["losses"]) == r["steps"] and all(math.isfinite(x) for x in r["losses"])
    # the same seeds and global batch: the same losses (as tests/train/test_fsdp.py), half the trainable bytes
    torch.testing.assert_close(
        torch.tensor(s["fsdp"]["losses"]), torch.tensor(s["ddp"]["losses"]), rtol=1e-4, atol=1e-6
    )
    assert 0.45 <= s["ratio_trainable_param_bytes_fsdp_to_ddp"] <= 0.55
    assert 0.45 <= s["ratio_optimizer_state_bytes_fsdp_to_ddp"] <= 0.55
    assert positive(s["ratio_peak_fsdp_to_ddp"]) and positive(s["ratio_step_s_fsdp_to_ddp"])


def test_fsdp_section_with_one_gpu_is_skipped_in_one_line(monkeypatch, capsys, tmp_path):
    gpu = load_script()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    run = SimpleNamespace(cuda=True, sizes=gpu.dry_sizes(None), tmp=tmp_path, partial={})
    result = gpu.section_fsdp(run, gpu.Budget(10))
    assert capsys.readouterr().out == "[fsdp] skipped: needs 2 or more GPUs, 1 visible\n"
    assert result["skipped"] and result["processes"] == 1
    assert not list(tmp_path.iterdir())  # nothing launched, nothing written
