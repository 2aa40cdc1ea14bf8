"""One typed config behind the file, the flags and the help; the `controlnet train` command end to end."""

from __future__ import annotations

import json

import pytest
from train_tiny import TINY_SIZE

from controlnet import cli
from controlnet.config_docs import field_docs
from controlnet.train.config import DataConfig, OptimConfig, TrainConfig, config_from_dict, resolve_config


def test_file_then_flags_then_validation(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "optim:\n  lr: 0.0001\n  grad_accum: 2\ndata:\n  path: somewhere\ntrain:\n  log_with: tensorboard\n"
    )
    config = resolve_config(
        path, {"optim.lr": "3e-4", "data.random_flip": "true", "checkpoint.export_formats": "original"}
    )
    assert isinstance(config, TrainConfig)
    assert config.optim.lr == 3e-4 and config.optim.grad_accum == 2 and config.data.random_flip is True
    assert config.checkpoint.export_formats == ("original",)
    assert config.train.log_with == ("tensorboard",)  # one name in a file, not its letters
    from_file = tmp_path / "formats.yaml"
    from_file.write_text("checkpoint:\n  export_formats: diffusers,original\n")
    assert resolve_config(from_file).checkpoint.export_formats == ("diffusers", "original")
    assert config.data.random_augmentation  # random flip bypasses the latent cache
    defaults = TrainConfig()
    assert defaults.data.empty_prompt_prob == 0.5 and defaults.optim.lr == 1e-5  # paper Sec. 3.3 / reference
    with pytest.raises(ValueError, match="empty_prompt_prob=1.5"):
        resolve_config(None, {"data.empty_prompt_prob": "1.5"})
    with pytest.raises(ValueError, match="no field 'lrr'"):
        resolve_config(None, {"optim.lrr": "1"})
    with pytest.raises(ValueError, match="unknown sections"):
        (tmp_path / "bad.json").write_text(json.dumps({"optimiser": {}}))
        resolve_config(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        resolve_config(None, {"train.mixed_precision": "fp8"})


def test_every_field_has_a_docstring_for_the_help():
    for cls in (DataConfig, OptimConfig):
        docs = field_docs(cls)
        assert set(docs) == set(cls.__dataclass_fields__)
    assert "50%" in field_docs(DataConfig)["empty_prompt_prob"]


def test_train_command_writes_a_complete_run_folder(fill_data, base_dir, tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps(
            {
                "model": {"base": str(base_dir), "hint_channels": [8, 16]},
                "data": {"path": str(fill_data), "resolution": TINY_SIZE},
            }
        )
    )
    run = tmp_path / "run"
    argv = [
        "train",
        str(config),
        "--train.output_dir",
        str(run),
        "--train.max_steps",
        "2",
        "--train.batch_size",
        "2",
        "--optim.lr",
        "1e-3",
        "--validation.every",
        "2",
        "--validation.num_samples",
        "2",
        "--validation.steps",
        "2",
        "--quiet",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "finished at step 2" in out and "floor" in out and "ceiling" in out
    for name in (
        "config.json",
        "metrics.jsonl",
        "report.html",
        "final/controlnet/config.json",
        "final/controlnet.safetensors",
        "checkpoints/step-0000002/state.json",
        "samples/reference.png",
    ):
        assert (run / name).exists(), name
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 2
    # a run folder saved before data.num_workers was retired resumes from its own config.json
    saved = json.loads((run / "config.json").read_text())
    saved["data"]["num_workers"] = 0
    (run / "config.json").write_text(json.dumps(saved))
    assert cli.main(["train", str(run / "config.json"), "--train.max_steps", "3", "--quiet"]) == 0
    assert "finished at step 3" in capsys.readouterr().out
    assert "num_workers" not in json.loads((run / "config.json").read_text())["data"]
    # a user error is one line and exit status 2
    assert (
        cli.main(["train", "--data.path", str(tmp_path / "missing"), "--train.output_dir", str(tmp_path / "x")])
        == 2
    )
    assert "no such folder or file" in capsys.readouterr().err


def test_train_help_lists_fields_with_their_docstrings(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--optim.lr" in out and "--data.empty_prompt_prob" in out and "AdamW learning rate" in out


def test_a_retired_field_loads_from_saved_configs_but_is_no_flag(tmp_path, caplog, capsys):
    saved = TrainConfig().to_dict()
    saved["data"]["num_workers"] = 4  # written by a version that had the (never used) field
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    with caplog.at_level("WARNING", logger="controlnet.train.config"):
        assert resolve_config(path) == TrainConfig() == config_from_dict(saved)
    assert "ignoring the retired key 'num_workers'" in caplog.text
    with pytest.raises(ValueError, match="no field 'num_workers'"):
        resolve_config(None, {"data.num_workers": "2"})
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", "--data.num_workers", "2"])
    assert exited.value.code == 2 and "unrecognized arguments: --data.num_workers" in capsys.readouterr().err
    saved["data"]["num_workerz"] = 1  # anything else unknown is still refused by name
    with pytest.raises(ValueError, match=r"unknown keys \['num_workerz'\]"):
        config_from_dict(saved)


def test_flags_are_the_config_fields_spelled_as_in_a_file_and_read_as_their_types(tmp_path, capsys):
    from controlnet.train.commands import overrides_from
    from controlnet.train.config import SECTIONS

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = capsys.readouterr().out
    for section, cls in SECTIONS.items():
        for name in cls.__dataclass_fields__:
            assert f"--{section}.{name} " in help_text, f"--{section}.{name}"
    assert "--model.sd_locked SD_LOCKED" in help_text and "--no-model" not in help_text  # bools take a value
    assert "(default: 1e-05)" in help_text  # the dataclass default, though a config file may replace it

    argv = [
        "train",
        "--model.ema",
        "false",
        "--data.random_flip",
        "yes",
        "--model.hint_channels",
        "8,16",
        "--checkpoint.export_formats",
        "diffusers,original",
        "--optim.lr",
        "3e-4",
        "--train.max_steps",
        "7",
    ]
    overrides = overrides_from(cli.build_parser().parse_args(argv))
    assert overrides == {
        "model.ema": False,
        "data.random_flip": True,
        "model.hint_channels": (8, 16),
        "checkpoint.export_formats": ("diffusers", "original"),
        "optim.lr": 3e-4,
        "train.max_steps": 7,
    }
    config = resolve_config(None, overrides)
    assert config.model.ema is False and config.model.hint_channels == (8, 16) and config.train.max_steps == 7
    # a flag not given leaves the config file's value
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.0001\n")
    args = cli.build_parser().parse_args(["train", str(path), "--train.max_steps", "3"])
    assert overrides_from(args) == {"train.max_steps": 3}
    assert resolve_config(args.config, overrides_from(args)).optim.lr == 1e-4
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", "--model.ema", "maybe"])
    assert exited.value.code == 2 and "--model.ema 'maybe': expected true or false" in capsys.readouterr().err


def test_demo_flags_build_the_demo_config():
    from controlnet.settings_cli import given_values
    from controlnet.train.demo import DemoConfig

    args = cli.build_parser().parse_args(
        ["demo", "--steps", "5", "--minutes", "0.5", "--tokenizer-2", "tok", "--early-stop", "--quiet"]
    )
    demo = DemoConfig(**given_values(args, DemoConfig))
    assert (demo.steps, demo.minutes, demo.tokenizer_2, demo.early_stop) == (5, 0.5, "tok", True)
    assert DemoConfig(**given_values(cli.build_parser().parse_args(["demo", "--no-early-stop"]), DemoConfig)) == (
        DemoConfig()
    )
