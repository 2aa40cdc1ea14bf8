"""Generation refuses images too large to be real and truncated ones, by name and before any model is loaded:
conditions (`--cond`, manifests, the library), init images (`--image`) and masks (`--mask`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from bad_images import bomb_png, encoded, truncated
from controlnet.cli import main
from controlnet.errors import ImageError
from controlnet.generate.control_images import condition_tensor, to_pil

GARBAGE = b"these are not weights"


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    (tmp_path / "cut.png").write_bytes(truncated())
    return tmp_path


@pytest.fixture
def unloadable_base(saved, tmp_path):
    """The tiny base with every weights file replaced by garbage: only loading it can find that out, so an error
    about an image, not about weights, proves the image was refused before any model was loaded."""
    base = tmp_path / "unloadable-base"
    shutil.copytree(saved / "base", base)
    weights = sorted(base.rglob("*.safetensors")) + sorted(base.rglob("*.bin"))
    assert weights
    for path in weights:
        path.write_bytes(GARBAGE)
    return base


def generate(base, saved, out, *extra) -> list[str]:
    return [
        "generate",
        "--base",
        str(base),
        "--controlnet",
        str(saved / "cn_diffusers"),
        "--steps",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("controlnet generate: error: ")
    return lines[0]


def test_the_unloadable_base_really_fails_to_load(unloadable_base, saved, tmp_path):
    """The control for the tests below: with a good condition, loading is what fails."""
    try:
        rc = main(generate(unloadable_base, saved, tmp_path / "out", "a cat", "--cond", str(saved / "cond1.png")))
    except Exception as err:  # diffusers' own error (an OSError today) for an unreadable file
        rc = type(err).__name__
    assert rc != 0, rc
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize(
    ("flag", "name", "words"),
    [
        ("--cond", "bomb.png", ("condition image", "3,600,000,000 pixels", "over the limit")),
        ("--cond", "cut.png", ("condition image", "truncated or corrupt")),
        ("--image", "bomb.png", ("--image", "3,600,000,000 pixels")),
        ("--image", "cut.png", ("--image", "truncated or corrupt")),
        ("--mask", "bomb.png", ("--mask", "3,600,000,000 pixels")),
    ],
)
def test_bad_images_are_one_line_before_any_model_loads(
    unloadable_base, saved, bad_files, capsys, flag, name, words
):
    cond = str(bad_files / name) if flag == "--cond" else str(saved / "cond1.png")
    extra = ["a cat", "--cond", cond]
    if flag != "--cond":
        extra += ["--image", str(bad_files / name if flag == "--image" else saved / "cond2.png")]
    if flag == "--mask":
        extra += ["--mask", str(bad_files / name)]
    out = bad_files / "out"
    assert main(generate(unloadable_base, saved, out, *extra)) == 2
    line = one_line(capsys)
    assert name in line and "weights" not in line, line
    for word in words:
        assert word in line, line
    assert not out.exists()


def test_a_bomb_in_a_manifest_names_the_file_and_nothing_is_written_for_it(saved, bad_files, capsys):
    manifest = bad_files / "jobs.jsonl"
    lines = [
        {"id": "good", "prompt": "a cat", "cond": str(saved / "cond1.png")},
        {"id": "bomb", "prompt": "a dog", "cond": "bomb.png"},
    ]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = bad_files / "out"
    assert main(generate(saved / "base", saved, out, "--manifest", str(manifest), "--cfg", "1")) == 2
    err = capsys.readouterr().err
    errors = [line.split("controlnet generate: error: ")[1] for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err  # (the manifest's progress bar shares stderr)
    assert "bomb.png" in errors[0] and "over the limit" in errors[0]
    assert (out / "good.png").is_file() and not list(out.glob("bomb*"))


def test_the_library_refuses_bomb_paths_bytes_and_lazily_opened_images(sd_pipe, bad_files):
    with pytest.raises(ImageError, match="condition image .*bomb.png: 3,600,000,000 pixels"):
        sd_pipe("a cat", [bad_files / "bomb.png", bad_files / "bomb.png"], steps=1)
    with pytest.raises(ImageError, match="^init image: 3,600,000,000 pixels"):
        to_pil(bomb_png(), "init image")
    (bad_files / "big.png").write_bytes(bomb_png(9000, 9000))  # PIL itself opens it without a word
    with Image.open(bad_files / "big.png") as lazy, pytest.raises(ImageError, match="mask: 9000x9000"):
        to_pil(lazy, "mask")


def test_conditions_may_be_encoded_bytes(saved):
    """The HTTP server passes uploads as bytes: they read as the same file on disk does."""
    path = saved / "cond1.png"
    from_bytes = condition_tensor(path.read_bytes(), 48, 32, "crop_and_resize")
    np.testing.assert_array_equal(from_bytes.numpy(), condition_tensor(path, 48, 32, "crop_and_resize").numpy())
    assert to_pil(encoded(Image.open(path)), "condition image").size == (64, 64)
