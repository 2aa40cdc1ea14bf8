"""`controlnet export CHECKPOINT --out FOLDER` (train/sharded_export.py): a training checkpoint written as the trainer's
final export, in one process without a process group. An FSDP2 checkpoint of 2 real gloo processes gives exactly the
run's gathered export; a DDP checkpoint (EMA kept) its own; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import _args
from train_helpers import final_weights, tiny_config

from controlnet.cli import main
from controlnet.testing.launch import accelerate_launch
from controlnet.train.checkpoint import list_checkpoints
from controlnet.train.sharded_export import export_checkpoint
from controlnet.train.trainer import train

EXPORT_FILES = ("controlnet/diffusion_pytorch_model.safetensors", "controlnet.safetensors")
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
# 3 steps, per-process batch 2, a checkpoint at every step (keep 3: steps 1-3 stay)
FSDP = ("--train.distributed", "fsdp", "--checkpoint.every", "1", "--checkpoint.keep", "3")


def fsdp_command(fill_data, base_dir, out: Path, processes: int = 2, *extra: str) -> list[str]:
    return [*accelerate_launch(processes), *_args(fill_data, base_dir, out, 2), *FSDP, *extra]


def launch(cmd: list[str]) -> subprocess.CompletedProcess:
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def assert_same_export(a: Path, b: Path, exact: bool = True) -> None:
    """Two export folders hold the same files, configs and tensors (bit for bit unless `exact` is False)."""
    for rel in EXPORT_FILES:
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        assert x.keys() == y.keys(), rel
        for k in x:
            if exact:
                assert torch.equal(x[k], y[k]), (rel, k)
            else:
                torch.testing.assert_close(y[k], x[k], rtol=1e-6, atol=1e-7)
    config = "controlnet/config.json"
    assert json.loads((a / config).read_text()) == json.loads((b / config).read_text())


def export(capsys, checkpoint: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["export", str(checkpoint), "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fsdp_reference_run(fill_data, base_dir, out: Path) -> Path:
    """A 2-process FSDP2 run of 3 steps with a sharded checkpoint at each step, and its final export."""
    start = time.time()
    launch(fsdp_command(fill_data, base_dir, out))
    print(f"2-process fsdp run: {time.time() - start:.1f} s")
    return out


@pytest.fixture(scope="module")
def fsdp_run(fill_data, base_dir, tmp_path_factory):
    return fsdp_reference_run(fill_data, base_dir, tmp_path_factory.mktemp("fsdp") / "run")


@pytest.mark.slow
def test_an_fsdp_checkpoint_exports_in_one_process_to_the_runs_gathered_export(fsdp_run, tmp_path, capsys):
    import torch.distributed as dist

    newest = list_checkpoints(fsdp_run)[-1]
    assert newest.name == "step-0000003" and len(list((newest / "sharded").glob("*.distcp"))) == 2
    start = time.time()
    code, out, err = export(capsys, newest, tmp_path / "export")
    with capsys.disabled():
        print(f"export: {time.time() - start:.1f} s")
    assert code == 0, err
    assert "wrote step 3 of the fsdp checkpoint" in out
    assert not dist.is_initialized()  # one process, no process group
    # the same files as the trainer's final/ (gathered on rank 0 by the run), bit for bit
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["controlnet", "controlnet.safetensors"]
    assert_same_export(fsdp_run / "final", tmp_path / "export")
    # one format only, as asked
    code, _, err = export(capsys, newest, tmp_path / "diffusers", "--formats", "diffusers")
    assert code == 0, err
    assert [p.name for p in (tmp_path / "diffusers").iterdir()] == ["controlnet"]


@pytest.mark.slow
def test_an_fsdp_checkpoint_with_an_ema_exports_the_ema_as_the_trainer_does(fill_data, base_dir, tmp_path, capsys):
    """The EMA's shards (ema.N entries beside the weights) replace the trained weights, as in the run's final/."""
    run = tmp_path / "run"
    start = time.time()
    launch(fsdp_command(fill_data, base_dir, run, 2, "--optim.ema_decay", "0.5", "--train.max_steps", "2"))
    with capsys.disabled():
        print(f"2-process fsdp run with an EMA: {time.time() - start:.1f} s")
    newest = list_checkpoints(run)[-1]
    code, _, err = export(capsys, newest, tmp_path / "export")
    assert code == 0, err
    assert_same_export(run / "final", tmp_path / "export")
    # the trained weights themselves (the checkpoint's model entries) are not what was exported
    import torch.distributed.checkpoint as dcp

    exported = final_weights(run)
    raw = {"model": {k: torch.empty_like(v) for k, v in exported.items()}}
    with warnings.catch_warnings():  # no process group: "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(raw, checkpoint_id=str(newest / "sharded"), no_dist=True)
    assert any(not torch.equal(raw["model"][k], exported[k]) for k in exported)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_a_deepspeed_checkpoint_exports_in_one_process_to_the_runs_gathered_export(
    fill_data, base_dir, tmp_path, capsys, stage
):
    """The fp32 master weights from every rank's partition (DeepSpeed's zero_to_fp32), as the trainer's export
    gathers them (safe_get_full_fp32_param): the same files, bit for bit."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install 'controlnet[deepspeed]')")
    run = tmp_path / "run"
    options = ("--train.distributed", "deepspeed", "--train.zero_stage", str(stage))
    start = time.time()
    launch([*accelerate_launch(2), *_args(fill_data, base_dir, run, 2), *options])
    print(f"2-process ZeRO-{stage} run: {time.time() - start:.1f} s")
    (newest,) = list_checkpoints(run)
    assert (newest / "deepspeed").is_dir()
    start = time.time()
    code, out, err = export(capsys, newest, tmp_path / "export")
    with capsys.disabled():
        print(f"export: {time.time() - start:.1f} s")
    assert code == 0, err
    assert "wrote step 3 of the deepspeed checkpoint" in out
    assert_same_export(run / "final", tmp_path / "export")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_an_fsdp_checkpoint_on_a_transformer_base_exports_to_the_runs_gathered_export(tmp_path, capsys, arch):
    """SD3 / Flux: the net rebuilt from the transformer's config (2 copied blocks, Flux + 1 single block), written in
    the diffusers folder and the publisher's one file as the trainer's export."""
    from test_fsdp_transformer import _args as transformer_args
    from train_tiny import make_fill_dataset

    from controlnet.testing.tiny_transformer_bases import write_flux_base, write_sd3_base

    write = write_sd3_base if arch == "sd3" else write_flux_base
    world = {"data": make_fill_dataset(tmp_path / "fill", n=8), arch: write(tmp_path / arch / "base")}
    run = tmp_path / "run"
    start = time.time()
    launch([*accelerate_launch(2), *transformer_args(world, arch, run), "--train.distributed", "fsdp"])
    with capsys.disabled():
        print(f"2-process fsdp run on the tiny {arch} base: {time.time() - start:.1f} s")
    (newest,) = list_checkpoints(run)
    code, out, err = export(capsys, newest, tmp_path / "export")
    assert code == 0, err
    assert "wrote step 3 of the fsdp checkpoint" in out
    assert_same_export(run / "final", tmp_path / "export")


def test_a_ddp_checkpoint_exports_its_ema_weights_as_the_trainer_does(fill_data, base_dir, tmp_path, capsys):
    run = (
        tmp_path / "run"
    )  # the base from its folder: the run's config.json names it (the export reads its configs)
    train(tiny_config(fill_data, run, model__base=base_dir, train__max_steps=2, optim__ema_decay=0.9))
    (newest,) = list_checkpoints(run)
    code, out, err = export(capsys, newest, tmp_path / "export")
    assert code == 0, err
    assert "wrote step 2 of the ddp checkpoint" in out
    assert_same_export(run / "final", tmp_path / "export")
    trained = load_file(str(newest / "controlnet.safetensors"))  # the EMA differs from the trained weights
    exported = load_file(str(tmp_path / "export" / EXPORT_FILES[0]))
    assert any(not torch.equal(trained[k], exported[k]) for k in trained)

    # a run that continues a ControlNet file (model.controlnet): the net is rebuilt from that file's architecture
    more = tmp_path / "continued"
    net = str(run / "final" / "controlnet")
    train(tiny_config(fill_data, more, model__base=base_dir, model__controlnet=net, train__max_steps=1))
    code, _, err = export(
        capsys, list_checkpoints(more)[-1], tmp_path / "export-continued", "--formats", "diffusers"
    )
    assert code == 0, err
    weights = load_file(str(tmp_path / "export-continued" / EXPORT_FILES[0]))
    assert weights.keys() == final_weights(more).keys()
    assert all(torch.equal(weights[k], final_weights(more)[k]) for k in weights)


def test_a_one_process_checkpoint_on_a_flux_base_exports_its_ema(tmp_path, capsys):
    """A transformer net's full checkpoint (one process): the EMA in the trainer's transformer layouts."""
    from test_transformer_training import flow_config
    from train_tiny import make_fill_dataset

    from controlnet.testing.tiny_transformer_bases import write_flux_base

    world = {
        "data": make_fill_dataset(tmp_path / "fill", n=8),
        "flux": write_flux_base(tmp_path / "flux" / "base"),
    }
    run = tmp_path / "run"
    train(flow_config(world, "flux", run, train__max_steps=2, optim__ema_decay=0.9))
    (newest,) = list_checkpoints(run)
    code, out, err = export(capsys, newest, tmp_path / "export")
    assert code == 0, err
    assert "wrote step 2 of the ddp checkpoint" in out
    assert_same_export(run / "final", tmp_path / "export")


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], list(folder.iterdir())


def test_bad_input_is_one_line_exit_2_and_nothing_written(fill_data, base_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(fill_data, run, model__base=base_dir, train__max_steps=1))
    (good,) = list_checkpoints(run)
    out = tmp_path / "out" / "export"
    out.parent.mkdir()
    cases = {}
    cases["missing"] = (tmp_path / "nope", "checkpoint not found")
    cases["run folder"] = (
        run,
        f"not a training checkpoint (expected a folder RUN/checkpoints/step-N holding "
        f"state.json); this run's newest is {good}",
    )
    sharded = tmp_path / "incomplete" / "checkpoints" / good.name
    shutil.copytree(good, sharded)
    (sharded / "sharded").mkdir()  # an FSDP2 checkpoint without torch.distributed.checkpoint's .metadata
    cases["incomplete"] = (sharded, "train.distributed=fsdp checkpoint without sharded/.metadata")
    orphan = tmp_path / "orphan" / "checkpoints" / good.name
    shutil.copytree(good, orphan)  # no run folder config.json two folders up
    cases["no config"] = (orphan, "run config not found")
    other = tmp_path / "other"
    shutil.copytree(run, other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["hint_channels"] = [4, 8]  # a config that builds another net than the checkpoint's
    (other / "config.json").write_text(json.dumps(config))
    cases["other net"] = (list_checkpoints(other)[0], "do not fit the net its run config builds")
    for name, (folder, expected) in cases.items():
        code, printed, err = export(capsys, folder, out)
        assert code == 2, name
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert not printed, name
        assert not out.exists(), name
        _no_leftovers(out.parent)
    code, _, err = export(capsys, good, out, "--formats", "diffusers,onnx")
    assert code == 2 and "'onnx' is not one of diffusers, original" in err
    out.mkdir()
    code, _, err = export(capsys, good, out)
    assert code == 2 and "already exists" in err and not any(out.iterdir())

    # a write that fails after the first format (a full disk): no export folder, no hidden leftovers
    import controlnet.io.api

    save = controlnet.io.api.save_controlnet

    def save_then_fail(net, path, format):
        if format == "original":
            raise OSError(28, "No space left on device")
        return save(net, path, format=format)

    monkeypatch.setattr(controlnet.io.api, "save_controlnet", save_then_fail)
    target = tmp_path / "out" / "full-disk"
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(good, target)
    assert not target.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["export"]  # the folder made above, nothing else
