"""Union training on data with a column per condition type (data.union_columns; data/sources.py `union_source`):
an imagefolder (metadata.jsonl) and a parquet dataset with canny and depth columns, some rows without depth. The
sources read each type's bytes, a union run trains on both (as on the same samples in the 'sources' layout), and
bad settings or data are refused in one line before anything loads."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from train_helpers import final_weights, tiny_config
from train_tiny import make_tiny_base

from controlnet.data.sources import union_source
from controlnet.train.trainer import Trainer, train

COLUMNS = {"canny": "canny_image", "depth": "depth_image"}
SPEC = "canny=canny_image,depth=depth_image"
N = 8


def _rows(fill_data: Path, folder: Path) -> list[dict]:
    """The first N fill samples as files in `folder`: target, canny (the outline) and depth (the target in grey),
    every third sample without depth (its depth cell None); one row per sample with the files' relative paths."""
    (folder / "canny").mkdir(parents=True)
    (folder / "depth").mkdir()
    lines = [json.loads(x) for x in (fill_data / "prompt.json").read_text().splitlines()][:N]
    rows = []
    for k, line in enumerate(lines):
        target = Image.open(fill_data / line["target"]).convert("RGB")
        target.save(folder / f"target-{k}.png")
        Image.open(fill_data / line["source"]).convert("RGB").save(folder / "canny" / f"{k}.png")
        depth = None
        if k % 3:
            depth = f"depth/{k}.png"
            target.convert("L").convert("RGB").save(folder / depth)
        rows.append(
            {
                "image": f"target-{k}.png",
                "canny_image": f"canny/{k}.png",
                "depth_image": depth,
                "text": line["prompt"],
            }
        )
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data(fill_data, tmp_path_factory):
    """{"imagefolder": metadata.jsonl folder, "parquet": a .parquet file (images embedded as bytes), "sources": the
    same samples in the 'sources' layout, "rows": the rows, "files": where the files are}."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("union-columns")
    with pytest.MonkeyPatch.context() as mp:  # parquet files are converted into this cache, not the user's
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(root / "hf-cache"))
        folder = root / "imagefolder"
        rows = _rows(fill_data, folder)
        _write_jsonl(folder / "metadata.jsonl", rows)
        sources = root / "sources"
        shutil.copytree(folder, sources)
        (sources / "metadata.jsonl").unlink()
        lines = [
            {
                "target": r["image"],
                "prompt": r["text"],
                "sources": {t: r[c] for t, c in COLUMNS.items() if r[c]},
            }
            for r in rows
        ]
        (sources / "prompt.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
        embedded = {
            name: [None if r[name] is None else {"bytes": (folder / r[name]).read_bytes()} for r in rows]
            for name in ("image", *COLUMNS.values())
        }
        ds = datasets.Dataset.from_dict({**embedded, "text": [r["text"] for r in rows]})
        for name in embedded:
            ds = ds.cast_column(name, datasets.Image())
        ds.to_parquet(str(root / "data.parquet"))
        yield {"imagefolder": folder, "parquet": root / "data.parquet", "sources": sources, "rows": rows}


def test_column_sources_read_each_types_bytes_and_skip_empty_cells(data):
    folder, rows = data["imagefolder"], data["rows"]
    original = union_source(data["sources"])
    for path in (data["imagefolder"], data["parquet"]):
        source = union_source(path, COLUMNS)
        assert len(source) == N and source.layout == "union"
        for i, row in enumerate(rows):
            held = [t for t, c in COLUMNS.items() if row[c]]
            assert source.types(i) == held == (["canny", "depth"] if i % 3 else ["canny"])
            target, conditions = source.read(i)
            assert target == (folder / row["image"]).read_bytes()
            assert conditions == {t: (folder / row[COLUMNS[t]]).read_bytes() for t in held}
            assert source.prompt(i) == row["text"]
            assert source.content_key(i) == original.content_key(i)  # the same sample, whatever its layout
            assert str(path) in source.where(i)


def _run(data: dict, layout: str, out: Path) -> dict:
    extra = {} if layout == "sources" else {"data__union_columns": SPEC}
    config = tiny_config(data[layout], out, model__architecture="union", train__max_steps=2, **extra)
    summary = train(config, make_tiny_base())
    assert summary.status == "finished" and summary.step == 2
    return final_weights(out)


@pytest.fixture(scope="module")
def sources_weights(data, tmp_path_factory):
    """The net after 2 steps on the samples in the 'sources' layout."""
    return _run(data, "sources", tmp_path_factory.mktemp("sources-run"))


@pytest.mark.parametrize("layout", ["imagefolder", "parquet"])
def test_a_union_run_on_a_column_dataset_trains_as_on_the_sources_layout(data, sources_weights, layout, tmp_path):
    weights = _run(data, layout, tmp_path / "run")
    # the same samples, order, cache keys and type draws: the same net, bit for bit
    assert weights.keys() == sources_weights.keys()
    assert all(torch.equal(weights[k], sources_weights[k]) for k in weights)


def _refusal(config) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        Trainer(config).setup()  # model.base builtin: nothing loads before the checks
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_union_columns_settings_and_data_are_refused_in_one_line(data, tmp_path):
    def config(path, name, spec=SPEC, **overrides):
        overrides = {"model__architecture": "union", **overrides}
        return tiny_config(path, tmp_path / name, data__union_columns=spec, **overrides)

    for path in (
        data["imagefolder"],
        data["parquet"],
    ):  # a missing column: the setting, column and columns present
        message = _refusal(config(path, "a", "canny=canny_image,depth=depth_map"))
        assert "data.union_columns[depth]='depth_map'" in message and "'depth_image'" in message
        assert "'canny_image'" in message and "'text'" in message
    empty = tmp_path / "empty"  # a row without a condition
    shutil.copytree(data["imagefolder"], empty)
    rows = [dict(r) for r in data["rows"]]
    rows[4].update(canny_image="", depth_image=None)
    _write_jsonl(empty / "metadata.jsonl", rows)
    message = _refusal(config(empty, "b"))
    assert message.startswith(f"{empty / 'metadata.jsonl'}: line 5 holds no condition")
    message = _refusal(tiny_config(data["imagefolder"], tmp_path / "c", data__union_columns=SPEC))
    assert message.startswith(f"data.union_columns={SPEC}: only for model.architecture=union (got controlnet)")
    message = _refusal(config(data["sources"], "d"))
    assert "imagefolder (metadata.jsonl) and hf layouts" in message and "is original" in message
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w"):
        pass
    assert "is webdataset" in _refusal(config(shard, "e"))
    message = _refusal(config(data["imagefolder"], "f", model__union_types="canny"))
    assert message.startswith(f"data.union_columns={SPEC}: condition type 'depth' is not one of model.union_types")
    with pytest.raises(ValueError, match="'canny' is not TYPE=COLUMN"):
        config(data["imagefolder"], "g", "canny")
    assert not any((tmp_path / name).exists() for name in "abcdef")  # no run folder left behind
