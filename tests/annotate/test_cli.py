"""`controlnet annotate`: files and folders, outputs, one-line errors and non-zero exits."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import skimage.data

from controlnet.annotate import annotate
from controlnet.annotate.image import read_image
from controlnet.cli import main


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "astronaut.png"), skimage.data.astronaut()[:, :, ::-1])
    cv2.imwrite(str(folder / "coffee.png"), skimage.data.coffee()[:, :, ::-1])
    (folder / "notes.txt").write_text("not an image, not picked up from a folder")
    return folder


def test_annotate_a_folder_writes_one_map_per_image(photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["annotate", "canny", str(photos), "-o", str(out), "-O", "low_threshold=50"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.png", "coffee.png"]
    written = read_image(out / "coffee.png")
    np.testing.assert_array_equal(written, annotate(skimage.data.coffee(), "canny", low_threshold=50))


def test_annotate_files_with_detect_resolution(photos, tmp_path):
    out = tmp_path / "out"
    code = main(
        ["annotate", "scribble", str(photos / "astronaut.png"), "-o", str(out), "--detect-resolution", "256"]
    )
    assert code == 0
    assert set(np.unique(read_image(out / "astronaut.png"))) == {0, 255}


def test_keypoints_json_inputs(tmp_path):
    document = {"canvas_width": 64, "canvas_height": 48, "people": [{"pose_keypoints_2d": [10, 10, 1] + [0] * 51}]}
    (tmp_path / "pose.json").write_text(json.dumps(document))
    assert main(["annotate", "openpose_json", str(tmp_path / "pose.json"), "-o", str(tmp_path / "out")]) == 0
    image = read_image(tmp_path / "out" / "pose.png")
    assert image.shape == (48, 64, 3) and image[10, 10].tolist() == [255, 0, 0]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)
    return err[-1]


def test_unreadable_image_is_one_line_and_exit_2(photos, tmp_path, capsys):
    (photos / "broken.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    assert main(["annotate", "canny", str(photos / "broken.png"), "-o", str(out)]) == 2
    line = one_line_error(capsys)
    assert "cannot read" in line and "broken.png" in line
    assert not out.exists() or not any(out.iterdir())  # nothing (half-)written


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-O", "nonsense=1"], "no option 'nonsense'"),
        (["-O", "low_threshold=abc"], "cannot read 'abc'"),
        (["-O", "low_threshold"], "expected KEY=VALUE"),
        (["--weights", "x.pth"], "does not take it"),
    ],
)
def test_bad_options_are_one_line_errors(photos, tmp_path, capsys, extra, message):
    assert main(["annotate", "canny", str(photos), "-o", str(tmp_path / "out"), *extra]) == 2
    assert message in one_line_error(capsys)


@pytest.mark.parametrize(
    ("name", "option", "expected"),
    [
        ("canny", "low_threshold=50", 50),
        ("canny", "detect_resolution=None", None),  # an optional option: none/null
        ("shuffle", "seed=null", None),
        ("softedge", "sigmas=1,2.5", (1.0, 2.5)),
        ("hed", "safe=no", False),
        ("lines", "method=fast", "fast"),
    ],
)
def test_options_are_read_as_the_annotator_s_field_types(name, option, expected):
    import argparse

    from controlnet.annotate.commands import build_options

    args = argparse.Namespace(name=name, option=[option], detect_resolution=None, weights=None)
    key = option.partition("=")[0]
    assert build_options(args) == {key: expected}


def test_missing_input_and_existing_output(photos, tmp_path, capsys):
    assert main(["annotate", "canny", str(tmp_path / "nope.png"), "-o", str(tmp_path / "out")]) == 2
    assert "not found" in one_line_error(capsys)
    out = tmp_path / "out"
    assert main(["annotate", "invert", str(photos / "coffee.png"), "-o", str(out)]) == 0
    assert main(["annotate", "invert", str(photos / "coffee.png"), "-o", str(out)]) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert main(["annotate", "invert", str(photos / "coffee.png"), "-o", str(out), "--overwrite"]) == 0


def test_save_keypoints_needs_a_keypoint_detector(photos, tmp_path, capsys):
    assert main(["annotate", "canny", str(photos), "-o", str(tmp_path / "out"), "--save-keypoints"]) == 2
    assert "--save-keypoints" in one_line_error(capsys)


def test_missing_weights_is_one_line_and_nothing_written(photos, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CONTROLNET_ANNOTATORS", raising=False)
    out = tmp_path / "out"
    assert main(["annotate", "hed", str(photos), "-o", str(out)]) == 2
    assert "ControlNetHED.pth" in one_line_error(capsys)
    assert main(["annotate", "depth", str(photos), "-o", str(out), "--weights", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in one_line_error(capsys)
    assert not out.exists()


def test_output_never_replaces_an_input(photos, capsys):
    assert main(["annotate", "invert", str(photos), "-o", str(photos), "--overwrite"]) == 2
    assert "also an input" in one_line_error(capsys)
    assert read_image(photos / "coffee.png").tolist() == skimage.data.coffee().tolist()
