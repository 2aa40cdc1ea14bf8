"""`controlnet annotate` on images no one should decode: a decompression bomb and truncated files are one line on
stderr, exit 2, nothing written; and `read_image` decodes good files as OpenCV did before it went through PIL."""

from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from bad_images import bomb_png, noise_image, truncated
from controlnet.annotate.image import hwc3, read_image

EXIT_USER_ERROR = 2


def annotate_cli(*args: str) -> subprocess.CompletedProcess:
    """The real command line in a fresh process (PYTHONPATH inherited), as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "controlnet.cli", "annotate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "always"},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == EXIT_USER_ERROR, result.stderr
    assert len(lines) == 1, result.stderr  # no traceback, no warning, no progress bar
    assert lines[0].startswith("controlnet annotate: error: ")
    for word in words:
        assert word in lines[0], lines[0]


def test_a_decompression_bomb_is_one_line_exit_2_and_nothing_written(tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    out = tmp_path / "out"
    result = annotate_cli("canny", str(tmp_path / "bomb.png"), "-o", str(out))
    assert_one_line_error(result, "bomb.png", "3,600,000,000 pixels", "over the limit")
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_image_is_one_line_exit_2_and_nothing_written(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(truncated(fmt))
    out = tmp_path / "out"
    result = annotate_cli("canny", str(path), "-o", str(out))
    assert_one_line_error(result, path.name, "truncated or corrupt")  # not libpng's own stderr line
    assert not out.exists()


def test_a_bomb_in_a_folder_stops_the_run_before_any_map_is_written(tmp_path):
    photos = tmp_path / "in"
    photos.mkdir()
    noise_image(64).save(photos / "a-good.png")  # sorted first: it would be annotated first
    (photos / "b-bomb.png").write_bytes(bomb_png())
    out = tmp_path / "out"
    result = annotate_cli("invert", str(photos), "-o", str(out))
    assert_one_line_error(result, "b-bomb.png")
    assert not out.exists()
    (photos / "b-bomb.png").unlink()  # the same run without it works: the refusal was the bomb's
    assert annotate_cli("invert", str(photos), "-o", str(out)).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["a-good.png"]


@pytest.mark.parametrize("kind", ["rgb", "rgba", "gray", "gray16", "palette", "palette_alpha", "gray_alpha"])
def test_read_image_gives_what_opencv_gave_for_each_kind_of_png(tmp_path, kind):
    """Parity with the former reader (cv2.imdecode, IMREAD_UNCHANGED) once both pass through `hwc3`."""
    rgb = noise_image(16, seed=2)
    image = {
        "rgb": rgb,
        "rgba": rgb.convert("RGBA"),
        "gray": rgb.convert("L"),
        "gray16": Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257),
        "palette": rgb.convert("P"),
        "gray_alpha": rgb.convert("LA"),
    }.get(kind)
    if kind == "palette_alpha":
        image = rgb.convert("P")
        image.info["transparency"] = 0  # palette entry 0 is transparent (a tRNS chunk)
    if kind in ("rgba", "gray_alpha"):
        alpha = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1)))
        image.putalpha(alpha)
    path = tmp_path / f"{kind}.png"
    image.save(path)  # PIL writes info["transparency"] as the tRNS chunk
    opencv = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    if opencv.ndim == 3:
        opencv = cv2.cvtColor(opencv, cv2.COLOR_BGR2RGB if opencv.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    ours = read_image(path)
    channels = {"gray": (), "gray16": (), "gray_alpha": (2,), "palette_alpha": (4,), "rgba": (4,)}.get(kind, (3,))
    assert ours.shape[2:] == channels  # gray stays (H, W), alpha is kept (OpenCV gave gray + alpha as 4 channels)
    if kind == "gray16":
        assert ours.dtype == np.uint16
        np.testing.assert_array_equal(ours, opencv)
    np.testing.assert_array_equal(hwc3(ours), hwc3(opencv))
