"""`controlnet inspect | convert | init | transfer` as a user runs them: real subprocesses, real files."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from controlnet import ControlNet, load_controlnet, save_controlnet
from controlnet.testing.tiny_models import make_tiny_unet, randomize


def run_cli(*args, ok=True):
    result = subprocess.run(
        [sys.executable, "-m", "controlnet.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def test_help_lists_the_checkpoint_tools():
    out = run_cli("--help").stdout
    for command in ("inspect", "convert", "init", "transfer"):
        assert command in out


def test_inspect_reports_format_parameters_and_outputs(combined):
    weights, _ = combined
    out = run_cli("inspect", weights).stdout
    assert "original-combined" in out
    assert "893,488" in out  # 128 control_model.* tensors of the tiny_a reference ControlNet
    assert "float32" in out
    assert "control outputs:  5" in out


@pytest.mark.slow  # the default suite's 15-minute budget; run with -m slow
def test_convert_both_ways_is_exact(combined, tmp_path):
    weights, config = combined
    run_cli("convert", weights, tmp_path / "diffusers", "--to", "diffusers", "--config", config)
    assert "diffusers-controlnet" in run_cli("inspect", tmp_path / "diffusers").stdout
    run_cli("convert", tmp_path / "diffusers", tmp_path / "back.safetensors", "--to", "original")
    original = {k: v for k, v in load_file(weights).items() if k.startswith("control_model.")}
    back = load_file(tmp_path / "back.safetensors")
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in back)


@pytest.mark.slow  # 16 s (subprocesses): the default suite's 15-minute budget; run with -m slow
def test_failed_convert_is_one_line_and_leaves_nothing(combined, tmp_path):
    weights, _ = combined
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli("convert", weights, out_dir / "dst", "--to", "diffusers", ok=False)  # no --config
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "cannot tell the architecture" in result.stderr
    assert list(out_dir.iterdir()) == []
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:1000])
    result = run_cli("convert", cut, out_dir / "dst", "--to", "diffusers", ok=False)
    assert result.returncode == 2 and "truncated or corrupt" in result.stderr and "Traceback" not in result.stderr
    assert list(out_dir.iterdir()) == []
    existing = out_dir / "taken.safetensors"
    existing.write_text("keep me")
    result = run_cli("convert", weights, existing, "--to", "original", ok=False)
    assert "already exists" in result.stderr and existing.read_text() == "keep me"


@pytest.mark.slow  # 10 s (a subprocess): the default suite's 15-minute budget; run with -m slow
def test_init_copies_the_base_encoder(combined, tmp_path):
    weights, config = combined
    run_cli("init", weights, tmp_path / "new", "--config", config)
    from controlnet import load_unet

    unet = load_unet(weights, config=json.loads(config.read_text())).state_dict()
    got = load_controlnet(tmp_path / "new").state_dict()
    assert set(got) == set(ControlNet.from_unet(make_tiny_unet_like(config)).state_dict())
    copied = [k for k in got if k in unet]
    assert len(copied) > 50 and all(torch.equal(got[k], unet[k]) for k in copied)
    zero = [k for k in got if k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    zero += ["controlnet_cond_embedding.conv_out.weight", "controlnet_cond_embedding.conv_out.bias"]
    assert all(torch.count_nonzero(got[k]) == 0 for k in zero)


@pytest.mark.slow  # three `controlnet init` processes, 27 s on 2 cores; test_init_copies_the_base_encoder runs by default
def test_init_is_reproducible_by_seed(combined, tmp_path):
    """The hint encoder starts random: the same --seed writes the same weights, another seed other ones."""
    weights, config = combined
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_cli(
            "init",
            weights,
            tmp_path / f"{name}.safetensors",
            "--to",
            "original",
            "--config",
            config,
            "--seed",
            seed,
        )
    a, b, c = (load_file(tmp_path / f"{n}.safetensors") for n in "abc")
    hint = [k for k in a if "input_hint_block" in k and torch.count_nonzero(a[k])]
    assert hint and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in hint)


def make_tiny_unet_like(config_path):
    from controlnet.io.api import build_unet

    return build_unet(json.loads(config_path.read_text()), device="meta")


@pytest.mark.slow  # the default suite's 15-minute budget (measured 44-135 s on a loaded run); -m slow
def test_transfer_adds_the_community_delta(tmp_path):
    base = make_tiny_unet("sd15", seed=0)
    community = make_tiny_unet("sd15", seed=0)
    with torch.no_grad():
        for p in community.down_blocks.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # a "fine-tune" of the base
    base.save_pretrained(tmp_path / "base")
    community.save_pretrained(tmp_path / "community")
    control = randomize(ControlNet.from_unet(base), seed=3)
    save_controlnet(control, tmp_path / "control", format="diffusers")

    run_cli("transfer", tmp_path / "control", tmp_path / "base", tmp_path / "community", tmp_path / "moved")
    moved = load_controlnet(tmp_path / "moved").state_dict()
    c, b, m = control.state_dict(), base.state_dict(), community.state_dict()
    for key, value in moved.items():
        expected = c[key] + (m[key] - b[key]) if key in b else c[key]
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=key)
    assert not torch.equal(
        moved["down_blocks.0.resnets.0.conv1.weight"], c["down_blocks.0.resnets.0.conv1.weight"]
    )

    run_cli("transfer", tmp_path / "control", tmp_path / "base", tmp_path / "base", tmp_path / "same")
    same = load_controlnet(tmp_path / "same").state_dict()
    assert all(torch.equal(same[k], c[k]) for k in c)  # community == base: bit-for-bit the input
