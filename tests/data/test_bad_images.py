"""A decompression bomb or a truncated image in a dataset is a bad file named by its path (refused before it is
decoded), and `skip_bad` trains without it, every layout alike."""

from __future__ import annotations

import io
import shutil
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from bad_images import bomb_png, encoded, noise_image, truncated
from controlnet.data.dataset import scan
from controlnet.data.sources import decode_image, open_source
from controlnet.errors import ImageError
from controlnet.world.dataset import write_dataset

MAX_SCAN_BYTES = 64 * 2**20  # scanning 6 tiny samples; decoding the bomb alone would take 3.6 GB


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    return write_dataset("fill", 6, 16, tmp_path_factory.mktemp("d") / "orig", seed=5, workers=1)


def test_bombs_and_truncated_images_are_named_by_path_and_skipped_on_request(original, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(original, bad)
    (bad / "target" / "2.png").write_bytes(bomb_png())
    (bad / "source" / "4.png").write_bytes(truncated(size=16))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as err:
            scan(open_source(str(bad)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert "2 of 6 samples" in message and "data.skip_bad=true" in message
    bomb_line = next(line for line in message.splitlines() if "target/2.png" in line)
    assert "ImageTooLarge: target: 3,600,000,000 pixels" in bomb_line  # ImageError's too-large kind
    cut_line = next(line for line in message.splitlines() if "source/4.png" in line)
    assert "condition: cannot read it, the file is truncated or corrupt" in cut_line
    assert peak < MAX_SCAN_BYTES
    found = scan(open_source(str(bad)), skip_bad=True)
    assert found.indices == [0, 1, 3, 5] and len(found.problems) == 2


def test_a_bomb_inside_a_tar_shard_is_named_by_shard_and_member(tmp_path):
    shard = tmp_path / "shard-000.tar"
    good = encoded(noise_image(16))
    with tarfile.open(shard, "w") as tar:
        members = [
            ("00000.png", good),
            ("00000.cond.png", good),
            ("00000.txt", b"a cat"),
            ("00001.png", bomb_png()),
            ("00001.cond.png", good),
            ("00001.txt", b"a bomb"),
        ]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError) as err:
        scan(open_source(str(shard)))
    assert "1 of 2 samples" in str(err.value)
    assert "shard-000.tar" in str(err.value) and "00001" in str(err.value) and "over the limit" in str(err.value)
    assert scan(open_source(str(shard)), skip_bad=True).indices == [0]


def test_decode_image_refuses_a_bomb_with_an_image_error():
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(bomb_png())
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(truncated())
