"""Every dataset layout yields the same (target, condition, prompt) triples; bad files are reported by path."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlnet.data.dataset import scan
from controlnet.data.sources import decode_image, detect_format, open_source
from controlnet.world.dataset import write_dataset


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    return write_dataset("fill", 6, 16, tmp_path_factory.mktemp("d") / "orig", seed=3, workers=1)


def _triples(source) -> list[tuple[bytes, bytes, str]]:
    out = []
    for i in range(len(source)):
        target, cond = source.read(i)
        out.append(
            (
                np.asarray(decode_image(target)).tobytes(),
                np.asarray(decode_image(cond)).tobytes(),
                source.prompt(i),
            )
        )
    return out


def _to_imagefolder(original: Path, out: Path) -> Path:
    shutil.copytree(original / "target", out / "images")
    shutil.copytree(original / "source", out / "conditioning_images")
    lines = [json.loads(x) for x in (original / "prompt.json").read_text().splitlines()]
    with open(out / "metadata.jsonl", "w") as f:
        for line in lines:
            name = Path(line["target"]).name
            f.write(json.dumps({"image": f"images/{name}", "conditioning_image": f"conditioning_images/{name}",
                                "text": line["prompt"]}) + "\n")  # fmt: skip
    return out


def _to_tars(original: Path, out: Path, per_shard: int = 4) -> Path:
    out.mkdir()
    lines = [json.loads(x) for x in (original / "prompt.json").read_text().splitlines()]
    for shard_start in range(0, len(lines), per_shard):
        with tarfile.open(out / f"shard-{shard_start // per_shard:03d}.tar", "w") as tar:
            for k, line in enumerate(lines[shard_start : shard_start + per_shard], shard_start):
                for name, data in ((f"{k:05d}.png", (original / line["target"]).read_bytes()),
                                   (f"{k:05d}.cond.png", (original / line["source"]).read_bytes()),
                                   (f"{k:05d}.txt", line["prompt"].encode())):  # fmt: skip
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return out


def test_three_layouts_give_identical_triples(original, tmp_path):
    folder = _to_imagefolder(original, tmp_path / "imagefolder")
    tars = _to_tars(original, tmp_path / "tars")
    assert [detect_format(p) for p in (original, folder, tars)] == ["original", "imagefolder", "webdataset"]
    reference = _triples(open_source(str(original)))
    assert len(reference) == 6 and reference[0][2].endswith("background")
    assert _triples(open_source(str(folder))) == reference
    assert _triples(open_source(str(tars))) == reference
    # the condition is the outline (mostly black), the target the filled image: never swapped
    target, cond = open_source(str(original)).read(0)
    assert np.asarray(decode_image(cond)).mean() < np.asarray(decode_image(target)).mean()


def test_missing_and_corrupt_files_are_reported_by_path(original, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(original, broken)
    (broken / "target" / "1.png").unlink()
    (broken / "source" / "3.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(broken / "source" / "4.png")  # size differs from its 16 px target
    with pytest.raises(ValueError) as err:
        scan(open_source(str(broken)))
    message = str(err.value)
    assert "3 of 6 samples" in message
    for bad in ("target/1.png", "source/3.png", "source/4.png"):
        assert bad in message
    found = scan(open_source(str(broken)), skip_bad=True)
    assert found.indices == [0, 2, 5]  # the others stay aligned with their own prompts
    assert len(found.problems) == 3


def test_unknown_layout_and_bad_index_lines_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no prompt.json"):
        detect_format(tmp_path)
    (tmp_path / "prompt.json").write_text('{"source": "a.png", "prompt": "x"}\n')
    with pytest.raises(ValueError, match="line 1 has no 'target'"):
        open_source(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        open_source(str(tmp_path / "nope"))


def test_hf_datasets_need_the_optional_package(tmp_path):
    (tmp_path / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install datasets"):
            open_source(str(tmp_path))
    else:
        pytest.skip("datasets is installed")
