"""benchmarks/gpu.py cannot rot: its dry mode (tiny configs, float32, 2 steps) runs every section as a real
subprocess on the CPU, and each section prints its numbers and writes them to the JSON; its helpers (peak table,
time limits, failure isolation) are pinned in process."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time

import pytest
from gpu_script_helpers import SCRIPT, load_script, positive

SECTIONS = ("generation", "generation_compile", "training", "finetune", "adam8bit")  # fsdp: test_gpu_fsdp.py


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "result.json"
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dry",
            "--device",
            "cpu",
            "--sections",
            ",".join(SECTIONS),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,  # the dry budgets sum to 175 s; their hard limits (1.1x + 5 s) to 218 s on a loaded machine
    )
    return done, time.perf_counter() - started, out


@pytest.mark.slow  # the default suite's 15-minute budget; run with -m slow
def test_dry_mode_runs_every_section_and_prints_its_numbers(dry_run):
    done, seconds, _ = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "FAILED" not in done.stdout, done.stdout
    header = lines[0]
    for word in ("GPU:", "torch", "diffusers", "CUDA", "generation float32", "training float32"):
        assert word in header, header
    number = r"\d+(?:\.\d+)?(?:e[-+]\d+)?"
    expected = {
        "generation": [
            rf"batch 1: ours {number} img/s, {number} ms/step \| diffusers {number} img/s",
            rf"batch 2: .*parity max \|diff\| {number} <= ",
        ],
        "generation_compile": [rf"batch 1: ours {number} img/s, {number} ms/step", r"compiled \+ first call"],
        "training": [
            rf"{number} samples/s",
            rf"{number} GFLOP/sample",
            r"MFU unknown",
            rf"peak memory {number} GB",
        ],
        "finetune": [
            rf"{number} samples/s",
            rf"ControlNet / fine-tune: memory {number}x \(paper 1.23x\), time "
            rf"{number}x \(paper 1.34x\)",
        ],
        "adam8bit": [rf"torch AdamW state {number} GB", r"AdamW8bit: not (installed|measured)"],
    }
    for section, patterns in expected.items():
        printed = "\n".join(line for line in lines if line.startswith(f"[{section}]"))
        for pattern in patterns:
            assert re.search(pattern, printed), f"{section}: no {pattern!r} in\n{printed}"
    assert re.search(rf"^total wall time {number} s; sections failed: none$", lines[-1]), lines[-1]
    assert seconds < 120


@pytest.mark.slow  # the default suite's 15-minute budget (measured 44-135 s on a loaded run); -m slow
def test_dry_mode_json_has_finite_positive_numbers(dry_run):
    done, _, out = dry_run
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == [] and positive(report["total_s"])
    env = report["environment"]
    assert env["mode"] == "dry" and env["torch"] and env["diffusers"] and env["generation_dtype"] == "float32"
    s = report["sections"]
    assert list(s) == list(SECTIONS) and all(s[name]["ok"] and positive(s[name]["seconds"]) for name in SECTIONS)
    compiled = s["generation_compile"]
    rows = [(s["generation"][f"batch_{b}"], ("first_call_s",)) for b in (1, 2)]
    rows.append((compiled["batch_1"], ("compile_and_first_call_s", "timed_calls")))
    for row, extra in rows:
        for who in ("ours", "diffusers"):
            for key in ("images_per_s", "ms_per_step", "s_per_call", *extra):
                assert positive(row[who][key]), (key, row[who])
        assert positive(row["speedup_images_per_s"]) and positive(row["speedup_ms_per_step"])
        assert 0 <= row["parity_max_abs_diff"] <= row["parity_tol"] == 1e-4  # float32: as generation.py
    assert all(s["generation"][f"batch_{b}"]["output_std"] > 1e-3 for b in (1, 2))
    assert compiled["backend"] == "eager" and compiled["errors"] == []
    train = s["training"]
    for key in (
        "samples_per_s",
        "step_ms",
        "gflop_per_step",
        "gflop_per_sample",
        "achieved_tflops",
        "peak_memory_gb",
        "controlnet_m",
    ):
        assert positive(train[key]), (key, train[key])
    assert train["mfu"] is None and train["peak_tflops"] is None  # no bf16 peak for a CPU: MFU is unknown, not 0
    assert math.isclose(train["samples_per_s"] * train["step_ms"] / 1e3, train["batch"])
    tune = s["finetune"]
    for key in ("samples_per_s", "step_ms", "peak_memory_gb", "memory_ratio", "time_ratio"):
        assert positive(tune[key]), (key, tune[key])
    assert math.isclose(tune["memory_ratio"], train["peak_memory_gb"] / tune["peak_memory_gb"])
    adam = s["adam8bit"]
    assert positive(adam["params_m"]) and positive(adam["adamw"]["state_gb"])
    # torch AdamW keeps two float32 moments per parameter (plus a step count per tensor)
    moments_gb = 2 * 4 * adam["params_m"] * 1e6 / 2**30
    assert moments_gb <= adam["adamw"]["state_gb"] < 1.01 * moments_gb


def test_peak_table_matches_names_and_refuses_variants():
    gpu = load_script()
    assert gpu.peak_for_name("NVIDIA H200")[0] == 989.0
    assert gpu.peak_for_name("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert gpu.peak_for_name("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert gpu.peak_for_name("NVIDIA L4")[0] == 121.0
    assert gpu.peak_for_name("NVIDIA GeForce RTX 4090")[0] == 165.0
    for other in ("NVIDIA H100 PCIe", "NVIDIA H200 NVL", "NVIDIA L40S", "Tesla V100-SXM2-16GB"):
        peak, note = gpu.peak_for_name(other)
        assert peak is None and "--peak-tflops" in note, other


def test_a_failing_or_runaway_section_prints_one_line_and_the_rest_run(monkeypatch, tmp_path, capsys):
    gpu = load_script()

    def boom(run, budget):
        raise RuntimeError("boom")

    def runaway(run, budget):
        while True:
            time.sleep(0.01)

    def fine(run, budget):
        print("[fine] 1.0 things/s")
        return {"things_per_s": 1.0}

    monkeypatch.setattr(gpu, "SECTIONS", {"boom": boom, "runaway": runaway, "fine": fine})
    monkeypatch.setattr(gpu, "DRY_BUDGETS", {"boom": 5, "runaway": 0.2, "fine": 5})
    monkeypatch.setattr(gpu, "HARD_LIMIT_GRACE_S", 0.3)
    import torch

    started = time.perf_counter()
    code = gpu.main(
        [
            "--dry",
            "--device",
            "cpu",
            "--sections",
            "boom,runaway,fine",
            "--out",
            str(tmp_path / "r.json"),
            "--threads",
            str(torch.get_num_threads()),
        ]
    )
    assert time.perf_counter() - started < 30
    printed = capsys.readouterr().out.splitlines()
    assert code == 1
    assert "[boom] FAILED: RuntimeError: boom" in printed
    assert any(line.startswith("[runaway] FAILED: TimeLimit: section runaway") for line in printed), printed
    assert "[fine] 1.0 things/s" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["failed"] == ["boom", "runaway"]
    assert report["sections"]["fine"] == {"ok": True, "things_per_s": 1.0, "seconds": pytest.approx(0, abs=1)}


DEVICE_SCRIPT = SCRIPT.with_name("gpu_device.sh")


def test_device_script_fetches_the_diffusers_that_pyproject_pins():
    """The lent GPU machine has no diffusers: the wheel the script carries there is the version we pin."""
    pinned = re.search(r'"diffusers==([^"]+)"', (SCRIPT.parents[1] / "pyproject.toml").read_text()).group(1)
    packages = re.search(r"^PACKAGES=\((.*?)\)", DEVICE_SCRIPT.read_text(), re.MULTILINE).group(1).split()
    assert f"diffusers=={pinned}" in packages and any(p.startswith("bitsandbytes==") for p in packages)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["bogus"], {}, "gpu_device.sh: unknown argument 'bogus'; expected none"),
        (
            [],
            {"WHEELS": "no-such-folder"},
            "gpu_device.sh: no wheels in no-such-folder/: run 'bash benchmarks/gpu_device.sh fetch'",
        ),
    ],
)
def test_device_script_refuses_in_one_line_before_installing_anything(tmp_path, args, env, message):
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(DEVICE_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "OUT": str(out), **env},
    )
    assert done.returncode == 2 and done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == "" and not out.exists()
