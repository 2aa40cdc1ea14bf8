"""Every dataset layout yields the same (target, condition, prompt) triples; bad files are reported by path."""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.data.dataset import PixelPairs, assign_buckets, scan
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
            f.write(
                json.dumps(
                    {
                        "image": f"images/{name}",
                        "conditioning_image": f"conditioning_images/{name}",
                        "text": line["prompt"],
                    }
                )
                + "\n"
            )
    return out


def _to_tars(original: Path, out: Path, per_shard: int = 4) -> Path:
    out.mkdir()
    lines = [json.loads(x) for x in (original / "prompt.json").read_text().splitlines()]
    for shard_start in range(0, len(lines), per_shard):
        with tarfile.open(out / f"shard-{shard_start // per_shard:03d}.tar", "w") as tar:
            for k, line in enumerate(lines[shard_start : shard_start + per_shard], shard_start):
                for name, data in (
                    (f"{k:05d}.png", (original / line["target"]).read_bytes()),
                    (f"{k:05d}.cond.png", (original / line["source"]).read_bytes()),
                    (f"{k:05d}.txt", line["prompt"].encode()),
                ):
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


def test_hf_datasets_need_the_optional_package(tmp_path, monkeypatch):
    (tmp_path / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(ValueError, match=r"pip install datasets.*controlnet\[hf\]"):
        open_source(str(tmp_path))


# Hugging Face `datasets`: built here with the library itself, from the world's files


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """The `datasets` module, with its cache (where parquet files are converted to Arrow) under tmp_path."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return datasets


def _rows(original: Path) -> list[dict]:
    return [json.loads(x) for x in (original / "prompt.json").read_text().splitlines()]


def _hf_dataset(hf, original: Path, names=("image", "conditioning_image", "text"), extra: bool = False):
    """A `datasets.Dataset` of the original layout's samples (image columns cast to `datasets.Image`)."""
    rows = _rows(original)
    image, cond, text = names
    columns = {
        image: [str(original / r["target"]) for r in rows],
        cond: [str(original / r["source"]) for r in rows],
        text: [r["prompt"] for r in rows],
    }
    if extra:
        columns["score"] = list(range(len(rows)))
    return hf.Dataset.from_dict(columns).cast_column(image, hf.Image()).cast_column(cond, hf.Image())


def _pil_triples(original: Path) -> list[tuple[bytes, bytes, str]]:
    """The samples as written, decoded with PIL directly (not through the sources)."""
    pixels = lambda f: np.asarray(Image.open(original / f).convert("RGB")).tobytes()  # noqa: E731
    return [(pixels(r["target"]), pixels(r["source"]), r["prompt"]) for r in _rows(original)]


def test_hf_save_to_disk_and_parquet_give_the_written_rows_in_order(hf, original, tmp_path):
    ds = _hf_dataset(hf, original)
    ds.save_to_disk(str(tmp_path / "disk"))  # images embedded as bytes
    reversed_ds = ds.select(range(len(ds) - 1, -1, -1))
    hf.DatasetDict({"test": reversed_ds, "train": ds}).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "data.parquet"))  # images kept as (absolute) paths
    (tmp_path / "shards" / "data").mkdir(parents=True)  # the Hub's layout: data/train-0000N-of-0000M.parquet
    for k, rows in enumerate((range(0, 4), range(4, 6))):
        ds.select(rows).to_parquet(str(tmp_path / "shards" / "data" / f"train-{k:05d}-of-00002.parquet"))
    paths = [tmp_path / "disk", tmp_path / "dict", tmp_path / "data.parquet", tmp_path / "shards"]
    assert [detect_format(p) for p in paths] == ["hf", "hf", "hf", "hf"]
    written = _pil_triples(original)
    assert len(written) == 6 and len({prompt for _, _, prompt in written}) > 1
    for path in paths:
        source = open_source(str(path))
        assert len(source) == 6 and source.layout == "hf"
        assert _triples(source) == written, path  # the "train" split of the DatasetDict, not "test"
    assert _triples(open_source(str(original))) == written


def test_hf_custom_column_names_and_clear_errors_for_missing_or_wrong_columns(hf, original, tmp_path):
    names = ("photo", "edges", "caption")
    _hf_dataset(hf, original, names, extra=True).save_to_disk(str(tmp_path / "custom"))
    source = open_source(str(tmp_path / "custom"), image="photo", conditioning="edges", caption="caption")
    assert _triples(source) == _pil_triples(original)
    with pytest.raises(ValueError) as err:
        open_source(str(tmp_path / "custom"), conditioning="edges")
    message = str(err.value)
    assert "data.image_column='image'" in message and "data.caption_column='text'" in message
    assert "conditioning" not in message.split("(columns")[0]  # 'edges' exists: not reported
    assert "photo" in message and "score" in message  # the columns there are
    with pytest.raises(ValueError, match="column 'score' is .*expected images"):
        open_source(str(tmp_path / "custom"), image="score", conditioning="edges", caption="caption")


def test_hf_corrupt_and_missing_images_are_reported_by_row_and_skipped_on_request(hf, original, tmp_path):
    rows = _rows(original)
    targets = [{"bytes": (original / r["target"]).read_bytes(), "path": None} for r in rows]
    targets[2] = {"bytes": b"not a png", "path": None}
    conds = [{"bytes": (original / r["source"]).read_bytes(), "path": None} for r in rows]
    small = io.BytesIO()
    Image.new("RGB", (8, 8)).save(small, "PNG")
    conds[4] = {"bytes": small.getvalue(), "path": None}  # size differs from its 16 px target
    columns = {"image": targets, "conditioning_image": conds, "text": [r["prompt"] for r in rows]}
    ds = (
        hf.Dataset.from_dict(columns)
        .cast_column("image", hf.Image())
        .cast_column("conditioning_image", hf.Image())
    )
    ds.save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(ValueError) as err:
        scan(open_source(str(tmp_path / "broken")))
    message = str(err.value)
    assert "2 of 6 samples" in message
    assert f"{tmp_path / 'broken'}[row 2]" in message and f"{tmp_path / 'broken'}[row 4]" in message
    assert "(8, 8)" in message
    source = open_source(str(tmp_path / "broken"))
    found = scan(source, skip_bad=True)
    assert found.indices == [0, 1, 3, 5] and len(found.problems) == 2
    written = _pil_triples(original)
    for i in found.indices:  # the kept rows keep their own images and prompts
        target, cond = source.read(i)
        assert (np.asarray(decode_image(target)).tobytes(), source.prompt(i)) == (written[i][0], written[i][2])
        assert np.asarray(decode_image(cond)).tobytes() == written[i][1]


def test_hf_relative_image_paths_resolve_next_to_the_parquet_file(hf, original, tmp_path, monkeypatch):
    folder = tmp_path / "pq"
    shutil.copytree(original, folder)
    rows = _rows(original)
    columns = {
        "image": [r["target"] for r in rows],
        "conditioning_image": [r["source"] for r in rows],
        "text": [r["prompt"] for r in rows],
    }
    hf.Dataset.from_dict(columns).to_parquet(str(folder / "data.parquet"))  # plain string path columns
    monkeypatch.chdir(tmp_path)  # not the parquet's folder
    assert _triples(open_source(str(folder / "data.parquet"))) == _pil_triples(original)
    (folder / rows[3]["source"]).unlink()
    with pytest.raises(ValueError) as err:
        scan(open_source(str(folder / "data.parquet")))
    assert f"{folder / 'data.parquet'}[row 3]: FileNotFoundError" in str(err.value)
    assert str(folder / rows[3]["source"]) in str(err.value)
    assert scan(open_source(str(folder / "data.parquet")), skip_bad=True).indices == [0, 1, 2, 4, 5]


def test_hf_content_key_is_stable_across_reopen_and_differs_between_rows(hf, original, tmp_path):
    _hf_dataset(hf, original).save_to_disk(str(tmp_path / "disk"))
    keys = [open_source(str(tmp_path / "disk")).content_key(i) for i in range(6)]
    assert keys == [open_source(str(tmp_path / "disk")).content_key(i) for i in range(6)]
    assert len(set(keys)) == 6
    # the same bytes and prompts as the files: a latent cache built from one layout serves the other
    assert keys == [open_source(str(original)).content_key(i) for i in range(6)]


def test_hf_and_imagefolder_feed_identical_training_pixels(hf, original, tmp_path):
    folder = _to_imagefolder(original, tmp_path / "imagefolder")
    _hf_dataset(hf, original).save_to_disk(str(tmp_path / "disk"))
    loaded = []
    for path in (folder, tmp_path / "disk"):
        source = open_source(str(path))
        found = scan(source)
        buckets = assign_buckets(found.sizes, 16, bucketing=False, multiple=8)
        pixels = PixelPairs(source, found.indices, buckets, center_crop=False, random_flip=True, seed=5)
        loaded.append([pixels.load(position, epoch) for position in range(len(pixels)) for epoch in (0, 1)])
    assert len(loaded[0]) == 12
    for (target_a, cond_a), (target_b, cond_b) in zip(*loaded, strict=True):
        assert target_a.shape == (3, 16, 16) and cond_a.dtype == torch.uint8
        assert torch.equal(target_a, target_b) and torch.equal(cond_a, cond_b)
