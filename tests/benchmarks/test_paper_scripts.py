"""The paper-claim scripts (benchmarks/paper/) are seeded: a rerun with the same seed gives the same numbers, and
each run writes its table, JSON and figure. Short settings (2 samples, 2 sampler steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.slow  # a 4-step union training, its evaluation and two timed runs, twice: about 3 minutes on 2 cores
def test_union_rerun_gives_the_same_fidelity_and_compares_every_condition(tmp_path, monkeypatch):
    """benchmarks/paper/union.py in fresh work folders: the fidelity table and the composition agree exactly across
    reruns (the timed s/step are measurements, not compared); a row per type, singles where they ship."""
    records = []
    for k in range(2):
        monkeypatch.setenv("CONTROLNET_PAPER_WORK", str(tmp_path / f"work{k}"))
        args = ("--union-steps", "4", "--time-steps", "2", "--samples", "64")
        records.append(run("union.py", tmp_path / f"out{k}", *args))
    first, again = records
    assert first["rows"] == again["rows"] and first["composition"] == again["composition"]
    assert [r["condition"] for r in first["rows"]] == ["canny", "seg", "pose", "depth"]
    assert [r["single net"] == "none ships" for r in first["rows"]] == [False, False, False, True]
    assert [r["setting"] for r in first["composition"]][1:] == [
        "builtin:seg + builtin:pose (composed)",
        "union net, seg + pose (one fused call)",
    ]
    assert set(first["seconds_per_step"]) == {"union", "single (canny)"}
    assert first["parameters"]["union"] > first["parameters"]["single"]


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


# ---------------------------------------------------------------------------------------------------------------
# --base builtin | builtin-dit (zero_convolutions.py, convergence.py)
@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread (two contended ones were 2-3x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_script(name: str):
    """A script of benchmarks/paper as a module (its main() not run)."""
    import importlib.util

    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(f"paper_{name}", SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


@pytest.mark.parametrize("script", ["zero_convolutions", "convergence"])
def test_base_flag_defaults_to_builtin_and_takes_builtin_dit_only(monkeypatch, capsys, script):
    common = load_common()
    module = load_script(script)
    parsed = []

    def parse_then_stop(*args, **kwargs):  # the script's own parser (its flags), then no work
        parsed.append(common.parse_args(*args, **kwargs))
        raise SystemExit(0)

    monkeypatch.setattr(module, "parse_args", parse_then_stop)
    for argv, base in (([], "builtin"), (["--base", "builtin-dit"], "builtin-dit")):
        monkeypatch.setattr(sys, "argv", [f"{script}.py", "--threads", str(torch.get_num_threads()), *argv])
        with pytest.raises(SystemExit):
            module.main()
        assert parsed[-1].base == base
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--base", "sd3"])
    with pytest.raises(SystemExit) as stop:
        module.main()
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse quotes the choices on some Pythons
    assert (
        last.replace("'", "")
        == f"{script}.py: error: argument --base: invalid choice: sd3 (choose from builtin, builtin-dit)"
    )


def test_builtin_dit_results_go_beside_the_unet_results_and_name_their_command(tmp_path):
    import argparse
    import time

    common = load_common()
    assert common.result_name("zero_convolutions", "builtin") == "zero_convolutions"
    assert common.result_name("convergence", "builtin-dit") == "convergence-dit"
    rows, columns = [{"arm": "zero", "final IoU": 0.5}], ["arm", "final IoU"]
    for base, name in (("builtin", "zero_convolutions"), ("builtin-dit", "zero_convolutions-dit")):
        args = argparse.Namespace(n=2, steps=2, cfg=4.0, seed=0, threads=1, out=tmp_path, base=base)
        common.write_results(name, args, rows, columns, time.time(), script="zero_convolutions.py")
    unet = (tmp_path / "zero_convolutions.md").read_text().splitlines()[0]
    assert unet == "`python benchmarks/paper/zero_convolutions.py` (n 2, steps 2, cfg 4.0, seed 0, threads 1)"
    dit = (tmp_path / "zero_convolutions-dit.md").read_text().splitlines()[0]
    assert dit == (
        "`python benchmarks/paper/zero_convolutions.py --base builtin-dit` "
        "(n 2, steps 2, cfg 4.0, seed 0, threads 1, base builtin-dit)"
    )
    assert json.loads((tmp_path / "zero_convolutions.json").read_text())["settings"].get("base") is None


def test_convergence_keeps_the_unet_demo_runs_and_puts_builtin_dit_runs_apart(monkeypatch):
    from controlnet.train.demo import DIT_DEMO_RECIPE

    module = load_script("convergence")
    assert module.demo_folder() == "demo-shapes-1000steps"  # the UNet runs already made are reused
    lr, steps = DIT_DEMO_RECIPE["lr"], DIT_DEMO_RECIPE["steps"]
    assert module.demo_folder("builtin-dit") == f"demo-dit-shapes-{steps}steps-lr{lr:g}"
    assert (
        module.demo_folder("builtin-dit", ("--task", "fill")) == f"demo-dit-shapes-{steps}steps-lr{lr:g}-task-fill"
    )
    monkeypatch.setitem(DIT_DEMO_RECIPE, "lr", 1e-4)  # a retuned recipe: other runs
    assert module.demo_folder("builtin-dit") == f"demo-dit-shapes-{steps}steps-lr0.0001"
    assert module.demo_folder() == "demo-shapes-1000steps"
    assert (module.SEEDS["builtin-dit"], module.THREADS["builtin-dit"]) == (3, (1,))


def test_the_builtin_dit_fill_recipe_is_the_demo_transformer_recipe_on_fill():
    from controlnet.train.config import resolve_config
    from controlnet.train.demo import DIT_DEMO_RECIPE

    common = load_common()
    flags = common.dit_fill_recipe()
    config = resolve_config(None, {k[2:]: v for k, v in zip(flags[::2], flags[1::2], strict=True)})
    unet = common.FILL_RECIPE
    unet_config = resolve_config(None, {k[2:]: v for k, v in zip(unet[::2], unet[1::2], strict=True)})
    assert config.model.base == "builtin-dit" and config.model.transformer_layers == 3
    assert config.model.hint_channels == () and config.optim.lr == DIT_DEMO_RECIPE["lr"]
    assert config.train.max_steps == DIT_DEMO_RECIPE["steps"]
    for section in ("data", "validation", "checkpoint", "flow"):  # the rest is builtin:fill's recipe
        assert getattr(config, section) == getattr(unet_config, section), section
    assert config.optim.ema_decay == unet_config.optim.ema_decay == 0.99
    assert config.train.batch_size == unet_config.train.batch_size == 32


def test_generate_on_a_transformer_base_is_one_call_per_prompt_as_validation(tmp_path, one_thread):
    """common.generate on an SD3 pipeline gives the trainer's validation images (image k from seed + k); at control
    scale 0 a net with Gaussian connections gives the base alone (the floor of zero_convolutions --base builtin-dit)."""
    import argparse

    import numpy as np

    from controlnet.generate.base import load_base
    from controlnet.generate.pipeline import ControlNetPipeline
    from controlnet.model.ablations import gaussian_connections
    from controlnet.model.transformer_controlnet import SD3ControlNet
    from controlnet.testing.tiny_transformer_bases import write_sd3_base
    from controlnet.train.validation import generate_on_transformer

    common = load_common()
    base = load_base(str(write_sd3_base(tmp_path / "sd3", t5=False)))
    zero = SD3ControlNet.from_transformer(base.transformer, num_layers=1).eval()
    moved = gaussian_connections(SD3ControlNet.from_transformer(base.transformer, num_layers=1), seed=0).eval()
    prompts = ["red circle", "blue square"]
    rng = np.random.default_rng(0)
    conds = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in prompts]
    args = argparse.Namespace(steps=2, cfg=4.0, seed=3)
    pipe = ControlNetPipeline.from_components(base, [moved])
    ours = common.generate(pipe, prompts, [conds], args)
    theirs = generate_on_transformer(pipe, prompts, conds, 2, 4.0, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True)) and ours[0].shape == (8, 8, 3)
    floor = common.generate(pipe, prompts, [conds], args, control_scale=0.0)
    plain = common.generate(ControlNetPipeline.from_components(base, [zero]), prompts, [conds], args)
    assert all(np.array_equal(a, b) for a, b in zip(floor, plain, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(ours, plain, strict=True))


def test_zero_convolutions_keeps_the_unet_runs_and_names_builtin_dit_runs_by_their_recipe():
    from controlnet.train.demo import DIT_DEMO_RECIPE

    module = load_script("zero_convolutions")
    assert [name for name, _ in module.ARMS.values()] == [
        "fill-zero-connections",
        "fill-gaussian-connections",
        "fill-lite-zero-connections",
    ]
    recipe = f"lr{DIT_DEMO_RECIPE['lr']:g}-{DIT_DEMO_RECIPE['steps']}steps"
    assert [name for name, _ in module.DIT_ARMS.values()] == [
        f"dit-fill-zero-connections-{recipe}",
        f"dit-fill-gaussian-connections-{recipe}",
    ]


@pytest.mark.slow  # a plain and a reward fine-tune of 2 steps and their evaluation, twice: about 2 minutes on 2 cores
def test_reward_rerun_gives_the_same_numbers(tmp_path, monkeypatch):
    """benchmarks/paper/reward.py in fresh work folders: its tables (fidelity, image error, KID, the one-step
    fidelity by timestep) agree exactly across reruns; the timed s/step are measurements, not compared."""
    records = []
    for k in range(2):
        monkeypatch.setenv("CONTROLNET_PAPER_WORK", str(tmp_path / f"work{k}"))
        out = tmp_path / f"out{k}"
        cmd = [sys.executable, str(SCRIPTS / "reward.py"), "--task", "pose", "--n", "3", "--steps", "2"]
        cmd += [
            "--threads",
            "1",
            "--out",
            str(out),
            "--train-steps",
            "2",
            "--samples",
            "64",
            "--variants",
            "200:0.5",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        # another length than the default 300 steps: its own claim, reward-pose-2steps, beside the default's
        main, onestep = (json.loads((out / f"reward-pose-2steps{s}.json").read_text()) for s in ("", "-onestep"))
        assert (out / "reward-pose-2steps.png").stat().st_size > 1000
        timeless = [{k: v for k, v in r.items() if k != "s / training step"} for r in main["rows"]]
        records.append((timeless, onestep["rows"]))
    assert records[0] == records[1]
    rows, onestep = records[0]
    assert [r["setting"] for r in rows] == [
        "base alone (floor)",
        "builtin:pose (shipped)",
        "+ 2 steps, plain (Eq. 5)",
        "+ 2 steps, reward, t <= 200, lambda 0.5",
        "ground truth (ceiling)",
    ]
    assert len(onestep) == 3 and "t=999" in onestep[0]
