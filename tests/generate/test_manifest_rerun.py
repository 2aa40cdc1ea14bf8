"""A manifest rerun whose every line is done says so before loading anything (a crashed run's rerun still loads and
does the missing lines: tests/generate/test_cli.py)."""

from __future__ import annotations

import json
import time

import pytest
from pipeline_tiny import base_args

from controlnet.cli import main


def test_a_manifest_rerun_with_every_line_done_loads_nothing(saved, tmp_path, capsys, monkeypatch):
    manifest = tmp_path / "jobs.jsonl"
    lines = [{"prompt": f"a cat {k}", "cond": str(saved / "cond1.png")} for k in range(2)]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    args = base_args(saved, out, "--manifest", str(manifest), "--no-grid", "--cfg", "1")
    assert main(args) == 0
    assert "generated 2, skipped 0" in capsys.readouterr().out

    import controlnet.generate.base as base

    monkeypatch.setattr(base, "load_base", lambda *a, **k: pytest.fail("a finished manifest loaded its base"))
    started = time.perf_counter()
    assert main(args) == 0
    assert time.perf_counter() - started < 2.0
    assert f"process 1/1: nothing to do: all 2 of its lines are done ({out})" in capsys.readouterr().out
