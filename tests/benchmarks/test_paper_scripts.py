"""The paper-claim scripts (benchmarks/paper/) are seeded: a rerun with the same seed gives the same numbers, and
each run writes its table, JSON and figure. Short settings (2 samples, 2 sampler steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "paper"


def run(script: str, out: Path, *extra: str) -> dict:
    cmd = [
        sys.executable,
        str(SCRIPTS / script),
        "--n",
        "2",
        "--steps",
        "2",
        "--threads",
        "1",
        "--out",
        str(out),
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    name = script.removesuffix(".py")
    assert (out / f"{name}.md").read_text().count("|") > 10
    assert (out / f"{name}.png").stat().st_size > 1000
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow  # three runs of the script, 37 s on 2 cores: the default suite stays under 15 minutes
def test_composition_rerun_gives_the_same_numbers_and_another_seed_does_not(tmp_path):
    first = run("composition.py", tmp_path / "a")
    again = run("composition.py", tmp_path / "b")
    assert first["rows"] == again["rows"]
    other = run("composition.py", tmp_path / "c", "--seed", "1")
    assert other["rows"] != first["rows"]
    settings = [r["setting"] for r in first["rows"]]
    assert settings == [
        "base alone",
        "seg (no person) alone",
        "pose alone",
        "seg (no person) + pose",
        "both at 0.5 each",
    ]
    assert all(0.0 <= v <= 1.0 for r in first["rows"] for k, v in r.items() if k != "setting")


@pytest.mark.slow
def test_guidance_rerun_gives_the_same_numbers(tmp_path):
    assert run("guidance.py", tmp_path / "a")["rows"] == run("guidance.py", tmp_path / "b")["rows"]


@pytest.mark.slow  # a seeded fine-tune run twice, 31 s on 2 cores
def test_transfer_rerun_gives_the_same_numbers(tmp_path, monkeypatch):
    """The community fine-tune is seeded too: two short runs in fresh work folders agree exactly."""
    rows = []
    for k in range(2):
        monkeypatch.setenv("CONTROLNET_PAPER_WORK", str(tmp_path / f"work{k}"))
        rows.append(
            run("transfer.py", tmp_path / f"out{k}", "--fine-tune-steps", "2", "--fine-tune-samples", "64")["rows"]
        )
    assert rows[0] == rows[1]
    settings = [r["setting"] for r in rows[0]]
    assert settings[:3] == ["base alone", "base + fill", "community alone"] and len(settings) == 7


def load_common():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import common
    finally:
        sys.path.remove(str(SCRIPTS))
    return common


@pytest.mark.parametrize(
    ("flag", "value"), [("--n", "0"), ("--steps", "-1"), ("--threads", "x"), ("--seeds", "0")]
)
def test_a_count_below_one_is_refused_in_argparse_one_line(monkeypatch, capsys, flag, value):
    common = load_common()
    monkeypatch.setattr(sys, "argv", ["script.py", flag, value])
    with pytest.raises(SystemExit) as stop:
        common.parse_args("d", n=5, extra=lambda p: p.add_argument("--seeds", type=common.positive_int, default=5))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"script.py: error: argument {flag}: {value!r}: expected an integer >= 1"
    )


def test_transfer_refuses_a_bad_count_before_any_work(tmp_path):
    """The script's own flags go through the same type: one line, exit 2, nothing written."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPTS / "transfer.py"), "--fine-tune-samples", "0", "--out", str(out)]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CONTROLNET_PAPER_WORK": str(tmp_path / "work")},
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == "transfer.py: error: argument --fine-tune-samples: '0': expected an integer >= 1", done.stderr
    assert not out.exists() and not (tmp_path / "work").exists()
