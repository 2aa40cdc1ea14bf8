"""`controlnet demo` on a transformer base (builtin-dit, SD3 layout): the transformer recipe's settings, the UNet
demo's settings unchanged, and a short real run on the shipped builtin-dit weights (data, training, report, the
exported net re-scored through the pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import controlnet.builtin
from controlnet import cli
from controlnet.train.config import resolve_config
from controlnet.train.demo import DIT_DEMO_RECIPE, DemoConfig, demo_overrides, reproduce, run_demo

DIT_FOLDER = Path(controlnet.builtin.__file__).parent / "weights_dit"  # what the spec builtin-dit names


def overrides(demo: DemoConfig, arch: str, blocks: int = 0) -> dict[str, str]:
    return demo_overrides(demo, 64, Path("/data"), Path("/run"), arch, blocks)


def test_the_unet_demo_trains_as_before():
    """The settings of the UNet demo are those it had before transformer bases (config.json of its runs)."""
    got = overrides(DemoConfig(), "unet")
    assert got["model.hint_channels"] == "4,8,16" and "model.transformer_layers" not in got
    assert (got["optim.lr"], got["train.max_steps"], got["train.max_minutes"]) == ("0.003", "1000", "9.0")
    assert (
        got
        == overrides(DemoConfig(), "unet", blocks=4)
        == demo_overrides(DemoConfig(), 64, Path("/data"), Path("/run"))
    )
    config = resolve_config(None, got)
    assert (config.optim.lr, config.train.max_steps, config.train.max_minutes) == (3e-3, 1000, 9.0)


def test_a_transformer_base_gets_the_transformer_recipe():
    got = overrides(DemoConfig(base="builtin-dit"), "sd3", blocks=4)
    assert "model.hint_channels" not in got  # the condition goes through the VAE, as SD3 ControlNets take it
    assert got["model.transformer_layers"] == "3"  # all joint blocks but the last (context_pre_only)
    assert float(got["optim.lr"]) == DIT_DEMO_RECIPE["lr"]
    assert int(got["train.max_steps"]) == DIT_DEMO_RECIPE["steps"]
    assert float(got["train.max_minutes"]) == DIT_DEMO_RECIPE["minutes"]
    unet = overrides(DemoConfig(base="builtin-dit"), "unet")
    same = {
        k for k in got if k not in ("optim.lr", "train.max_steps", "train.max_minutes", "model.transformer_layers")
    }
    assert {k: got[k] for k in same} == {k: unet[k] for k in same}  # everything else is the UNet demo's
    config = resolve_config(None, got)  # a valid training config
    assert config.model.hint_channels == () and config.model.transformer_layers == 3
    flux = overrides(DemoConfig(), "flux", blocks=19)  # Flux: the family's default copy (transformer_step.py)
    assert "model.transformer_layers" not in flux and "model.hint_channels" not in flux


def test_given_values_beat_the_recipe_on_either_base():
    demo = DemoConfig(lr=2e-4, steps=7, minutes=1.5)
    for arch in ("unet", "sd3"):
        got = overrides(demo, arch, blocks=4)
        assert (got["optim.lr"], got["train.max_steps"], got["train.max_minutes"]) == ("0.0002", "7", "1.5")


@pytest.mark.parametrize(("flag", "value"), [("lr", -1e-3), ("steps", -1), ("minutes", -2.0)])
def test_a_negative_recipe_value_is_refused(flag, value):
    with pytest.raises(ValueError, match=rf"^{flag}={value}: expected > 0 \(or 0: the base's recipe\)$"):
        DemoConfig(**{flag: value})


def test_demo_cli_refuses_a_bad_value_for_builtin_dit_in_one_line(tmp_path, capsys):
    code = cli.main(["demo", "--base", "builtin-dit", "--steps", "-3", "--out", str(tmp_path / "d"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("steps=-3: expected > 0 (or 0: the base's recipe)") and "\n" not in err
    assert not (tmp_path / "d").exists()


# 3.4 s in a session that has imported diffusers (1 thread); 22 s alone on a loaded machine, mostly imports
@pytest.mark.skipif(not (DIT_FOLDER / "model_index.json").is_file(), reason="builtin-dit is not shipped here")
def test_demo_on_builtin_dit_trains_reports_and_its_controlnet_reproduces_the_final_fidelity(tmp_path):
    demo = DemoConfig(
        out=str(tmp_path / "demo"),
        base=str(DIT_FOLDER),
        samples=36,
        steps=2,
        batch_size=4,
        validate_every=2,
        validation_samples=4,
        sampler_steps=2,
        threads=1,
    )
    summary = run_demo(demo, log=lambda *a: None)
    assert summary.status == "finished" and summary.step == 2
    assert summary.floor is not None and summary.ceiling > 0.9
    assert [s for s, _ in summary.validation] == [2]
    run = tmp_path / "demo" / "run"
    assert (run / "report.html").is_file()
    assert json.loads((run / "final" / "controlnet" / "config.json").read_text())["num_layers"] == 3
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["hint_channels"] == [] and config["model"]["transformer_layers"] == 3
    assert config["optim"]["lr"] == DIT_DEMO_RECIPE["lr"] and config["data"]["resolution"] == 64
    recorded, again = reproduce(run)  # re-loaded from disk through the transformer pipeline
    assert recorded == pytest.approx(again, abs=1e-6)
    assert summary.validation[-1] == (summary.step, recorded)
