"""`controlnet train` settles what it can before loading or writing anything: a training size the VAE cannot
encode, a ControlNet of another base family, a bad option (no run folder is left behind), and a rerun of a finished
run (answered from its checkpoint, without loading the base)."""

from __future__ import annotations

import time

import pytest
import torch
from train_tiny import TINY_SIZE

from controlnet import cli
from controlnet.testing.ldm_files import write_controlnet_file, write_unet_file
from controlnet.testing.tiny_models import TINY_UNET_CONFIGS, write_clip_vocab


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a base fails the test: the command must have answered before."""
    import controlnet.train.trainer as trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(trainer, "load_base", refuse)


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("controlnet train: error: "), err
    return err[0]


def test_a_size_the_vae_cannot_encode_is_refused_before_loading(fill_data, tmp_path, capsys, no_loading):
    run = tmp_path / "run"
    args = ["train", "--data.path", str(fill_data), "--train.output_dir", str(run), "--data.resolution", "250"]
    started = time.perf_counter()
    assert cli.main(args) == 2  # the built-in base: a 4x VAE
    assert time.perf_counter() - started < 2.0
    line = one_error(capsys)
    assert "data.resolution=250: must be a positive multiple of 4 (the VAE's 4x downscaling" in line
    checkpoint = tmp_path / "v1-5-pruned.safetensors"
    checkpoint.write_bytes(b"not read")  # every SD family's VAE is 8x: known without reading the file
    assert cli.main([*args, "--model.base", str(checkpoint)]) == 2
    assert "data.resolution=250: must be a positive multiple of 8 (the VAE's 8x downscaling" in one_error(capsys)
    assert not run.exists()


def test_a_controlnet_of_another_family_is_refused_from_the_headers(fill_data, tmp_path, capsys, no_loading):
    sd15 = dict(TINY_UNET_CONFIGS["sd15"], cross_attention_dim=768)
    sdxl = dict(TINY_UNET_CONFIGS["sdxl"], cross_attention_dim=2048)
    base = write_unet_file(tmp_path / "v1-5-fp16.safetensors", sd15, dtype=torch.float16)
    net = write_controlnet_file(tmp_path / "control_sdxl.safetensors", sdxl)
    run = tmp_path / "run"
    args = ["train", "--model.base", str(base), "--model.tokenizer", str(write_clip_vocab(tmp_path / "tok"))]
    args += ["--model.controlnet", str(net), "--data.path", str(fill_data), "--train.output_dir", str(run)]
    started = time.perf_counter()
    assert cli.main(args) == 2
    assert time.perf_counter() - started < 2.0
    assert (
        "ControlNet control_sdxl.safetensors is a ControlNet for Stable Diffusion XL, but base v1-5-fp16.safetensors "
        "is Stable Diffusion 1.x" in one_error(capsys)
    )
    assert not run.exists()


@pytest.mark.parametrize(
    "option,message",
    [
        (["--validation.every", "1", "--validation.num_samples", "24"], "leaves no training data"),
        (["--train.batch_size", "64"], "cannot fill one batch"),
        (["--checkpoint.resume", "nowhere"], "checkpoint.resume='nowhere': no such checkpoint folder"),
        (["--data.format", "original", "--data.path", "nowhere"], "data.path='nowhere': no such folder or file"),
    ],
)
def test_a_run_failing_on_an_option_leaves_no_run_folder(fill_data, base_dir, tmp_path, capsys, option, message):
    run = tmp_path / "run"
    args = ["train", "--model.base", str(base_dir), "--data.path", str(fill_data), "--train.output_dir", str(run)]
    args += ["--data.resolution", str(TINY_SIZE), "--model.hint_channels", "8,16", "--quiet", *option]
    assert cli.main(args) == 2
    assert message in one_error(capsys)
    assert not run.exists()


def test_rerunning_a_finished_run_says_so_without_loading(fill_data, base_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    args = ["train", "--model.base", str(base_dir), "--data.path", str(fill_data), "--train.output_dir", str(run)]
    args += ["--data.resolution", str(TINY_SIZE), "--model.hint_channels", "8,16", "--train.batch_size", "2"]
    args += ["--train.max_steps", "2", "--quiet"]
    assert cli.main(args) == 0
    assert "finished at step 2" in capsys.readouterr().out
    report = (run / "report.html").stat().st_mtime_ns

    import controlnet.train.trainer as trainer

    monkeypatch.setattr(trainer, "load_base", lambda *a, **k: pytest.fail("a finished run loaded its base"))
    started = time.perf_counter()
    assert cli.main(args) == 0
    assert time.perf_counter() - started < 2.0
    captured = capsys.readouterr()
    assert f"nothing to do: {run} is already finished at step 2 (train.max_steps=2)" in captured.err
    assert "finished at step 2" in captured.out and "trained ControlNet:" in captured.out
    assert (run / "report.html").stat().st_mtime_ns == report  # nothing rewritten
    monkeypatch.undo()
    # more steps asked: it resumes (and loads)
    assert cli.main([*args[:-3], "--train.max_steps", "3", "--quiet"]) == 0
    assert "finished at step 3" in capsys.readouterr().out


def test_the_library_s_trainer_checks_the_size_against_the_base_it_is_given(fill_data, tmp_path):
    from train_helpers import tiny_config
    from train_tiny import make_tiny_base

    from controlnet.train.trainer import train

    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"data.resolution=17: must be a positive multiple of 2 \(the VAE's 2x"):
        train(tiny_config(fill_data, run, data__resolution=17), base=make_tiny_base(latent=True))
    assert not run.exists()


def test_a_unet_setting_on_a_transformer_base_is_refused_before_loading(fill_data, tmp_path, capsys, no_loading):
    """An SD3 base trains (train/transformer_step.py), but a UNet-only setting on it is one line, before any loading,
    instead of a failure deep in the trainer."""
    from controlnet.testing.tiny_transformer_bases import write_sd3_base

    base = write_sd3_base(tmp_path / "sd3", t5=False)
    capsys.readouterr()  # what building the base printed
    run = tmp_path / "run"
    args = ["train", "--model.base", str(base), "--data.path", str(fill_data), "--train.output_dir", str(run)]
    assert cli.main([*args, "--model.sd_locked", "false"]) == 2
    line = one_error(capsys)
    assert "model.sd_locked=false" in line and "SD3 transformer base" in line, line
    assert not run.exists()
