"""The shipped ControlNets (builtin:NAME): they load by name everywhere and really control the built-in base."""

import copy
import subprocess
import sys

import numpy as np
import pytest

from controlnet.generate.base import controlnet_path
from controlnet.generate.builtin_format import BUILTIN_CONTROLNET, builtin_controlnets

# What each shipped net was trained for: the world task whose metric scores it (builtin/weights/controlnets/*/).
EXPECTED = {"fill", "canny", "seg", "pose"}


def test_every_shipped_controlnet_has_weights_a_config_and_a_card():
    shipped = builtin_controlnets()
    assert set(shipped) >= EXPECTED, sorted(shipped)
    for name, folder in shipped.items():
        card = (folder / "MODEL_CARD.md").read_text()
        assert "controlnet train" in card and "controlnet evaluate" in card, name  # the commands that made it
        assert (folder / "diffusion_pytorch_model.safetensors").stat().st_size < 4_000_000, name  # small data


def test_unknown_builtin_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="unknown built-in ControlNet 'builtin:nope'; expected one of: builtin:"):
        controlnet_path(BUILTIN_CONTROLNET + "nope")


@pytest.mark.parametrize("task", ["fill"])
def test_a_shipped_controlnet_beats_the_base_alone_on_held_out_conditions(task):
    """Fidelity on held-out world samples, re-detected in the images (paper Table 2's protocol), above the floor."""
    from controlnet.evaluate.heldout import evaluate_generator, generate_images, heldout_set
    from controlnet.generate.pipeline import ControlNetPipeline

    pipe = ControlNetPipeline.from_pretrained("builtin", controlnets=[f"builtin:{task}"])
    floor_pipe = copy.copy(pipe)  # the same base modules without the ControlNet: the floor
    floor_pipe.controlnets = []
    heldout = heldout_set(task, 6, size=64)
    settings = {"steps": 10, "guidance_scale": 4.0, "seed": 0}
    report = evaluate_generator(
        heldout,
        lambda prompts, conds: generate_images(pipe, prompts, conds, **settings),
        lambda prompts: generate_images(floor_pipe, prompts, [], **settings),
    )
    row = report.rows[0]
    assert row.model > row.floor + 0.2, report.table()


@pytest.mark.slow  # the default suite's 15-minute budget; run with -m slow
def test_generate_takes_a_builtin_controlnet_by_name(tmp_path):
    from PIL import Image

    from controlnet.world.dataset import make_pair

    source, _, prompt = make_pair("fill", 3, 64)
    Image.fromarray(source).save(tmp_path / "outline.png")
    cmd = [
        sys.executable,
        "-m",
        "controlnet.cli",
        "generate",
        prompt,
        "--cond",
        str(tmp_path / "outline.png"),
        "--steps",
        "4",
        "--out",
        str(tmp_path / "out"),
    ]
    controlled = subprocess.run(
        [*cmd, "--controlnet", "builtin:fill", "--name", "a"], capture_output=True, text=True, timeout=300
    )
    assert controlled.returncode == 0, controlled.stderr
    off = subprocess.run(
        [*cmd, "--controlnet", "builtin:fill", "--scale", "0", "--name", "b"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert off.returncode == 0, off.stderr
    a = np.asarray(Image.open(tmp_path / "out" / "a.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "out" / "b.png"), dtype=np.int16)
    assert np.abs(a - b).mean() > 5  # control is applied, and strength 0 is the base alone
    bad = subprocess.run([*cmd, "--controlnet", "builtin:nope"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "builtin:fill" in bad.stderr
