"""`controlnet generate` checks its arguments and files before any weights are read, says how it chose the size,
and closes its step bar at the last step."""

from __future__ import annotations

import io
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from controlnet.cli import main
from controlnet.generate.commands import StepBar

GARBAGE = b"not weights at all " * 64


@pytest.fixture
def garbage_base(saved, tmp_path):
    """The tiny diffusers base with every weights file replaced by garbage: loading it would fail."""
    base = tmp_path / "garbage_base"
    shutil.copytree(saved / "base", base)
    weights = [p for p in base.rglob("*") if p.suffix in (".safetensors", ".bin")]
    assert weights
    for path in weights:
        path.write_bytes(GARBAGE)
    return base


def generate(base, out, *extra):
    return ["generate", "a cat", "--base", str(base), "--steps", "1", "--out", str(out), *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("controlnet generate: error: "), err
    return err[0]


def test_garbage_base_fails_when_read(saved, garbage_base, tmp_path, capsys):
    """The premise of the tests below: these weights fail as soon as they are read."""
    args = generate(garbage_base, tmp_path, "--controlnet", str(saved / "cn_diffusers"), "--cond")
    try:
        failed = main([*args, str(saved / "cond1.png")]) != 0
    except Exception:  # the loader's own error for a corrupt file (not this test's concern)
        failed = True
    assert failed and list(tmp_path.glob("*.png")) == []


@pytest.mark.parametrize(
    "size,message",
    [
        (["--width", "250"], "width x height = 250 x auto: both must be positive multiples of 8"),
        (["--width", "64", "--height", "60"], "width x height = 64 x 60: both must be positive multiples of 8"),
        (["--height", "0"], "width x height = auto x 0"),
    ],
)
def test_bad_size_is_refused_before_any_weights_are_read(saved, garbage_base, tmp_path, capsys, size, message):
    args = generate(garbage_base, tmp_path, "--controlnet", str(saved / "cn_diffusers"), "--cond")
    start = time.perf_counter()
    rc = main([*args, str(saved / "cond1.png"), *size])
    elapsed = time.perf_counter() - start
    assert rc == 2 and message in one_error_line(capsys)
    assert elapsed < 2.0, f"refused after {elapsed:.1f} s"
    assert list(tmp_path.glob("*.png")) == []


def test_bad_size_for_a_single_file_is_refused_before_reading_it(saved, tmp_path, capsys):
    checkpoint = tmp_path / "v1-5-pruned.safetensors"
    checkpoint.write_bytes(GARBAGE)  # every SD family's VAE is 8x: the rule is known without reading the file
    assert main(generate(checkpoint, tmp_path, "--width", "250")) == 2
    assert "250 x auto: both must be positive multiples of 8" in one_error_line(capsys)


def test_files_are_checked_before_the_base_is_read(saved, garbage_base, tmp_path, capsys):
    net, cond = str(saved / "cn_diffusers"), str(saved / "cond1.png")
    assert main(generate(garbage_base, tmp_path, "--controlnet", str(tmp_path / "nonet"), "--cond", cond)) == 2
    assert "ControlNet not found: " in one_error_line(capsys)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + GARBAGE)
    assert main(generate(garbage_base, tmp_path, "--controlnet", net, "--cond", str(broken))) == 2
    assert f"condition image {broken}: cannot read its header, the file is corrupt" in one_error_line(capsys)
    assert main(generate(garbage_base, tmp_path, "--controlnet", net, "--cond", cond, "--image", str(broken))) == 2
    assert f"--image {broken}: cannot read its header, the file is corrupt" in one_error_line(capsys)
    assert main(generate(garbage_base, tmp_path, "--controlnet", net, "--cond", cond, "--steps", "0")) == 2
    assert "steps=0" in one_error_line(capsys)


def test_size_from_a_large_condition_is_scaled_to_the_native_size_and_said(saved, tmp_path, capsys):
    photo = tmp_path / "in" / "photo.png"
    photo.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 200, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "out"
    args = generate(saved / "base", out, "--controlnet", str(saved / "cn_diffusers"), "--cond", str(photo))
    assert main([*args, "--name", "photo"]) == 0
    err = capsys.readouterr().err
    assert (
        "size 200x96 from the condition -> 64x32 (the base's native 64 px, aspect kept; set --width/--height to "
        "override)" in err
    )
    with Image.open(out / "photo.png") as img:
        assert img.size == (64, 32) and "Size: 64x32" in img.text["parameters"]
    assert main([*args, "--name", "wide", "--width", "88"]) == 0  # 88 = 11 x 8: not a multiple of 16 (or 64)
    assert "-> 88x40" in capsys.readouterr().err  # 88 * 96 / 200 = 42.2 -> 40
    with Image.open(out / "wide.png") as img:
        assert img.size == (88, 40)


def test_step_bar_is_closed_at_the_last_step():
    """Closed at the last step, the bar is final before the VAE decode and saving; closing again draws nothing."""
    stream = io.StringIO()
    bar = StepBar("generate", file=stream)
    for step in (1, 2, 3):
        bar(step, 3)
    text = stream.getvalue()
    assert "3/3" in text and text.endswith("\n")  # tqdm ends a closed bar's line
    bar.close()  # what the command does after decoding and saving
    assert stream.getvalue() == text


def test_step_bar_through_the_cli_ends_before_the_outputs(saved, tmp_path, capsys):
    args = generate(saved / "base", tmp_path, "--controlnet", str(saved / "cn_diffusers"), "--steps", "2")
    assert main([*args, "--cond", str(saved / "cond1.png")]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("2/2") >= 1 and captured.err.endswith("\n")
    assert captured.out.strip().endswith("controlnet-0.png")
