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


def test_a_union_controlnet_is_scored_with_the_tasks_type_and_a_plain_net_refuses_one(tmp_path, capsys):
    """A fresh union net (zero-initialised: the base unchanged) on the built-in base: evaluated with the task's
    union type by default (seg -> the union name seg, id 5), model == floor exactly; --control-type on a plain
    net is one line naming the field."""
    from controlnet.builtin.base import load_builtin_base
    from controlnet.cli import main
    from controlnet.model.union_controlnet import UnionControlNet

    base = load_builtin_base()
    factor = base.image_size // base.unet.config.sample_size
    save_controlnet(
        UnionControlNet.from_unet(base.unet, num_control_type=8, hint_block_channels=(4, 8, 16),
                                  hint_downscale_factor=factor, num_trans_head=4),
        tmp_path / "union", format="diffusers",
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["evaluate", str(tmp_path / "union"), "--task", "seg", "--n", "2", "--steps", "2",
                     "--json", str(tmp_path / "report.json")])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["control_type"] == "seg" and report["task"] == "seg"
        row = report["rows"][0]
        assert row["model"] == row["floor"] and row["ceiling"] > row["floor"]
        plain = ControlNet.from_unet(base.unet, hint_block_channels=(4, 8, 16), hint_downscale_factor=factor)
        save_controlnet(plain, tmp_path / "plain", format="diffusers")
        capsys.readouterr()
        code = main(["evaluate", str(tmp_path / "plain"), "--task", "seg", "--n", "2", "--steps", "2",
                     "--control-type", "seg"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code != 0 and "control_type" in err and "not a union ControlNet" in err and err.count("\n") == 1, err
