"""The builtin-dit recipe (builtin/pretrain_dit.py, `pretrain-base --family sd3`): a resumed run ends with exactly the
weights of an uninterrupted one; resume refuses another family or architecture in one line; export writes a diffusers
SD3 folder that diffusers itself loads offline and samples from with its sampling.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from controlnet.builtin.config import DitModelConfig, PretrainConfig, TextEncoderConfig
from controlnet.builtin.pretrain import CHECKPOINT_NAME, RUN_CONFIG_NAME, pretrain
from controlnet.builtin.pretrain_dit import TRAINED, export_dit, pretrain_dit
from controlnet.generate.builtin_format import SAMPLING_FILE

TINY_DIT = DitModelConfig(
    layers=1,
    heads=1,
    head_dim=8,
    text=TextEncoderConfig(hidden_size=8, num_layers=2, num_heads=1, intermediate_size=16),
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when the CPU is shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(out, steps: int, **overrides) -> PretrainConfig:
    fields = dict(
        out=str(out),
        family="sd3",
        steps=steps,
        batch_size=2,
        warmup_steps=1,
        scene_fraction=0.5,
        scene_pool=2,
        fill_pool=8,
        dit=TINY_DIT,
    )
    fields.update(overrides)
    return PretrainConfig(**fields)


def assert_same_weights(a, b) -> None:
    for name in TRAINED:
        for label, x, y in ((name, a.modules[name], b.modules[name]), (f"ema_{name}", a.ema[name], b.ema[name])):
            x, y = x.state_dict(), y.state_dict()
            assert x.keys() == y.keys()
            for key in x:
                torch.testing.assert_close(x[key], y[key], rtol=0, atol=0, msg=f"{label}.{key}")


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = pretrain_dit(tiny_config(tmp_path / "straight", steps=3))
    pretrain_dit(tiny_config(tmp_path / "split", steps=3), stop_after=1)  # killed after step 1 ...
    pretrain_dit(tiny_config(tmp_path / "split", steps=3), resume=True, stop_after=1)  # ... and after step 2
    resumed = pretrain_dit(tiny_config(tmp_path / "split", steps=3), resume=True)
    assert straight.step == resumed.step == 3 and straight.stage == resumed.stage == "done"
    assert_same_weights(straight, resumed)
    # the run trained: step 3's weights are not the initial ones (the comparison above could not pass vacuously)
    fresh = pretrain_dit(tiny_config(tmp_path / "fresh", steps=3), stop_after=0)
    moved = fresh.modules["transformer"].state_dict()
    trained = straight.modules["transformer"].state_dict()
    assert any(not torch.equal(moved[k], trained[k]) for k in moved)
    assert sorted(p.name for p in (tmp_path / "split").glob(f"*{CHECKPOINT_NAME}*")) == [CHECKPOINT_NAME]


def test_resume_refuses_another_architecture_or_family_in_one_line(tmp_path):
    pretrain_dit(tiny_config(tmp_path / "dit", steps=1), stop_after=0)  # the initial checkpoint only
    with pytest.raises(ValueError, match="--resume"):
        pretrain_dit(tiny_config(tmp_path / "dit", steps=1))
    wider = DitModelConfig(**{**TINY_DIT.__dict__, "layers": 2})
    with pytest.raises(ValueError, match="architecture") as refused:
        pretrain_dit(tiny_config(tmp_path / "dit", steps=1, dit=wider), resume=True)
    assert "\n" not in str(refused.value)
    # an sd3 run resumed by the UNet recipe (--family forgotten), and a UNet run resumed as sd3
    with pytest.raises(ValueError, match="--family sd3") as refused:
        pretrain(tiny_config(tmp_path / "dit", steps=1, family="unet"), resume=True)
    assert "\n" not in str(refused.value)
    unet_run = tmp_path / "unet"
    unet_run.mkdir()
    (unet_run / CHECKPOINT_NAME).write_bytes(b"never read")  # refused from run_config.json alone
    config = json.loads((tmp_path / "dit" / RUN_CONFIG_NAME).read_text())
    (unet_run / RUN_CONFIG_NAME).write_text(json.dumps({**config, "family": "unet"}))
    with pytest.raises(ValueError, match="--family unet") as refused:
        pretrain_dit(tiny_config(unet_run, steps=1), resume=True)
    assert "\n" not in str(refused.value)


def test_export_is_a_diffusers_sd3_folder_sampled_offline_with_its_sampling_json(tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    state = pretrain_dit(tiny_config(tmp_path / "run", steps=2))
    facts = export_dit(tmp_path / "run", tmp_path / "model")
    assert facts["stage"] == "done" and facts["step"] == 2
    sampling = json.loads((tmp_path / "model" / SAMPLING_FILE).read_text())
    assert (sampling["guidance_scale"], sampling["steps"], sampling["max_sequence_length"]) == (4.0, 20, 0)
    # the EMA weights are the ones exported
    exported = SD3Transformer2DModel.from_pretrained(
        str(tmp_path / "model" / "transformer"), local_files_only=True
    )
    ema = state.ema["transformer"].state_dict()
    for key, value in exported.state_dict().items():
        torch.testing.assert_close(value, ema[key], rtol=0, atol=0, msg=key)
    raw = state.modules["transformer"].state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)

    # no T5: diffusers' documented way to load SD3 without it names the two absent components
    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(tmp_path / "model"), text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder_3 is None and pipe.transformer.config.sample_size * pipe.vae_scale_factor == 64

    def images(max_sequence_length: int):
        return pipe(
            ["red circle with blue background", "green square with yellow background"],
            num_inference_steps=2,
            guidance_scale=sampling["guidance_scale"],
            max_sequence_length=max_sequence_length,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    zero_tokens = images(sampling["max_sequence_length"])
    assert zero_tokens.shape == (2, 64, 64, 3) and zero_tokens.min() >= 0.0 and zero_tokens.max() <= 1.0
    # the zero tokens in T5's place enter the joint attention: the count in sampling.json changes the images
    assert not torch.allclose(torch.from_numpy(zero_tokens), torch.from_numpy(images(8)))


def test_cli_pretrains_resumes_refuses_and_exports(tmp_path, capsys):
    """The commands as a user runs them (in-process `controlnet.cli.main`: its parsing and one-line errors)."""
    from controlnet.cli import main

    run, model = tmp_path / "run", tmp_path / "model"
    common = ["world", "pretrain-base", "--out", str(run), "--batch-size", "2", "--warmup-steps", "1"]
    common += ["--fill-pool", "8", "--scene-pool", "2", "--scene-fraction", "0.5", "--threads", "1"]
    assert main([*common, "--family", "sd3", "--steps", "1"]) == 0
    assert "pretrain-base: done at step 1" in capsys.readouterr().out
    # resumed without --family: the UNet recipe refuses the sd3 run in one line, exit status 2
    assert main([*common, "--steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--family sd3" in err and "\n" not in err and "Traceback" not in err
    assert main([*common, "--family", "sd3", "--steps", "2", "--resume"]) == 0
    assert "pretrain-base: done at step 2" in capsys.readouterr().out
    assert main(["world", "export-base", "--run", str(run), "--out", str(model)]) == 0
    assert "'step': 2" in capsys.readouterr().out
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and (model / SAMPLING_FILE).is_file()


@pytest.mark.slow
def test_python_m_cli_pretrain_and_export(tmp_path):
    """The same through `python -m controlnet.cli` in a fresh process (slow: the imports alone take ~15 s)."""
    run, model = tmp_path / "run", tmp_path / "model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "controlnet.cli", "world"]
    subprocess.run(
        [*cli, "pretrain-base", "--family", "sd3", "--out", str(run), "--steps", "1", "--batch-size", "2"]
        + ["--fill-pool", "4", "--scene-fraction", "0", "--threads", "1"],
        check=True,
        env=env,
        capture_output=True,
    )
    subprocess.run([*cli, "export-base", "--run", str(run), "--out", str(model)], check=True, env=env)
    assert json.loads((model / SAMPLING_FILE).read_text())["max_sequence_length"] == 0
