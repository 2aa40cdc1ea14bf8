"""`controlnet evaluate` end to end on the shipped built-in base: a real subprocess, real files."""

import json
import subprocess
import sys

import pytest
import torch

from controlnet import ControlNet, save_controlnet


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "controlnet.cli", *map(str, args)], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # the default suite's 15-minute budget; run with -m slow
def test_fresh_controlnet_scores_like_the_floor(tmp_path):
    """A fresh ControlNet's zero convolutions leave the base unchanged (paper Eq. 3): model == floor exactly."""
    from controlnet.builtin.base import load_builtin_base

    base = load_builtin_base()
    net = ControlNet.from_unet(base.unet, hint_downscale_factor=base.image_size // base.unet.config.sample_size)
    save_controlnet(net, tmp_path / "fresh", format="diffusers")
    result = _run("evaluate", tmp_path / "fresh", "--n", 4, "--steps", 4, "--json", tmp_path / "report.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["task"] == "fill" and report["n"] == 4
    rows = {r["metric"]: r for r in report["rows"]}
    assert rows["disk IoU"]["model"] == rows["disk IoU"]["floor"]
    assert rows["disk IoU"]["ceiling"] > 0.95  # ground truth through the same metric
    assert "disk IoU" in result.stdout and "ceiling" in result.stdout
    assert torch.count_nonzero(net.controlnet_mid_block.weight) == 0


@pytest.mark.slow  # 15-minute budget: a fresh interpreter that imports the whole stack (34 s on a loaded machine)
def test_bad_arguments_are_one_line(tmp_path):
    result = _run("evaluate", tmp_path / "missing")
    assert result.returncode == 2 and "ControlNet not found" in result.stderr and result.stderr.count("\n") == 1
    result = _run("evaluate", tmp_path / "missing", "--n", 0)
    assert result.returncode == 2 and "--n must be >= 1" in result.stderr


def test_a_transformer_controlnet_on_builtin_dit(tmp_path, capsys):
    """builtin-dit:fill on the built-in transformer base (in-process CLI): the floor is the base alone (the net at
    strength 0), the shipped net fills the outlines far above it, the ceiling is the ground truth's."""
    from controlnet.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["evaluate", "builtin-dit:fill", "--base", "builtin-dit", "--task", "fill", "--n", "4",
                     "--steps", "10", "--json", str(tmp_path / "report.json")])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().err
    rows = {r["metric"]: r for r in json.loads((tmp_path / "report.json").read_text())["rows"]}
    iou = rows["disk IoU"]
    assert iou["model"] > iou["floor"] + 0.3 and iou["ceiling"] > 0.95, iou
