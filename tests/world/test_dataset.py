import json

import cv2
import numpy as np
import pytest

from controlnet.cli import main
from controlnet.world.dataset import TASKS, make_pair, read_prompt_lines, sample_seed, write_dataset
from controlnet.world.fill import fill_sample
from controlnet.world.scene_sample import scene_sample


def _read(path):
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]


@pytest.mark.parametrize("task", ["canny", "pose", "seg", "lines"])
def test_dataset_pairs_equal_the_scene_samples(task):
    for seed in range(5):
        sample = scene_sample(seed, 64, require_person=task == "pose")
        source, target, prompt = make_pair(task, seed, 64)
        assert np.array_equal(source, sample.conditions[task]) and np.array_equal(target, sample.image)
        assert prompt == sample.prompt


def test_write_dataset_layout(tmp_path):
    out = write_dataset("fill", 7, 32, tmp_path / "fill", seed=3, workers=1)
    lines = read_prompt_lines(out)
    assert [line["source"] for line in lines] == [f"source/{i}.png" for i in range(7)]
    assert [line["target"] for line in lines] == [f"target/{i}.png" for i in range(7)]
    for i, line in enumerate(lines):
        expected = fill_sample(sample_seed(3, i), 32)
        assert line["prompt"] == expected.prompt
        assert np.array_equal(_read(out / line["target"]), expected.image)
        assert np.array_equal(_read(out / line["source"]), expected.conditions["fill"])
    assert json.loads((out / "world.json").read_text())["task"] == "fill"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fill"]  # no temporary folder left


def test_parallel_and_serial_datasets_are_identical(tmp_path):
    a = write_dataset("depth", 600, 32, tmp_path / "a", workers=1)
    b = write_dataset("depth", 600, 32, tmp_path / "b", workers=2)
    assert (a / "prompt.json").read_text() == (b / "prompt.json").read_text()
    for i in (0, 299, 599):
        assert np.array_equal(_read(a / f"source/{i}.png"), _read(b / f"source/{i}.png"))
    assert len(list((b / "target").iterdir())) == 600
    assert len({line["prompt"] for line in read_prompt_lines(b)}) > 100


def test_every_task_makes_a_sample():
    for task in TASKS:
        source, target, prompt = make_pair(task, 1, 32)
        assert source.shape == target.shape == (32, 32, 3) and source.dtype == np.uint8 and prompt
        assert source.any(), task


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "hed", "--n", "3"], "task='hed'"),
        (["--task", "fill", "--n", "0"], "n=0"),
        (["--task", "fill", "--n", "3", "--size", "8"], "size=8"),
        (["--task", "seg", "--n", "3", "--size", "16"], "size=16"),
        (["--task", "fill", "--n", "3", "--workers", "0"], "workers=0"),
        (["--task", "union", "--n", "3"], "types: none given"),
        (["--task", "union", "--types", "canny,lines", "--n", "3"], "canny and lines are one union type"),
        (["--task", "union", "--types", "seg,fill", "--n", "3"], "'fill' is not a scene condition"),
        (["--task", "union", "--types", "seg,seg", "--n", "3"], "names a type twice"),
        (["--task", "seg", "--types", "seg", "--n", "3"], "types: only for task 'union'"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "data"
    assert main(["world", "make", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_existing_or_parentless_out(tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    assert main(["world", "make", "--task", "fill", "--n", "2", "--out", str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["world", "make", "--task", "fill", "--n", "2", "--out", str(tmp_path / "no" / "dir")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_cli_makes_a_dataset(tmp_path, capsys):
    out = tmp_path / "scribble"
    assert main(["world", "make", "--task", "scribble", "--n", "5", "--size", "32", "--out", str(out)]) == 0
    assert "wrote 5 scribble samples" in capsys.readouterr().out
    assert len(read_prompt_lines(out)) == 5 and len(list((out / "source").iterdir())) == 5


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    import controlnet.world.dataset as dataset

    calls = []

    def broken(task, seed, size):
        calls.append(seed)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return make_pair(task, seed, size)

    monkeypatch.setattr(dataset, "make_pair", broken)
    with pytest.raises(RuntimeError):
        dataset.write_dataset("fill", 5, 32, tmp_path / "out", workers=1)
    assert list(tmp_path.iterdir()) == []


def test_world_without_a_subcommand_prints_its_help(capsys):
    assert main(["world"]) == 2
    assert "make" in capsys.readouterr().out


def test_union_dataset_holds_each_scenes_maps_and_pose_only_with_a_person(tmp_path, capsys):
    """`world make --task union`: one scene per sample, its maps under their union names (lines -> mlsd), pose only
    when the scene shows a person; read by the union data source and accepted by the union trainer's data check."""
    from controlnet.data.sources import union_source
    from controlnet.train.config import DataConfig, ModelConfig, TrainConfig
    from controlnet.train.union import check_union_data

    out = tmp_path / "union"
    argv = ["world", "make", "--task", "union", "--types", "seg,pose,lines", "--n", "12", "--size", "32"]
    assert main([*argv, "--out", str(out), "--seed", "2", "--workers", "1"]) == 0
    assert "wrote 12 union samples" in capsys.readouterr().out
    lines = read_prompt_lines(out)
    with_person = 0
    for i, line in enumerate(lines):
        sample = scene_sample(sample_seed(2, i), 32)
        has_person = any(o.kind == "person" for o in sample.info["scene"].objects)
        with_person += has_person
        assert list(line["sources"]) == ["seg", *(["pose"] if has_person else []), "mlsd"]
        assert line["prompt"] == sample.prompt and np.array_equal(_read(out / line["target"]), sample.image)
        assert np.array_equal(_read(out / line["sources"]["mlsd"]), sample.conditions["lines"])
        assert np.array_equal(_read(out / line["sources"]["seg"]), sample.conditions["seg"])
    assert 0 < with_person < 12  # both kinds of scene occur in these 12
    assert json.loads((out / "world.json").read_text())["types"] == ["seg", "pose", "lines"]
    source = union_source(out)
    assert len(source) == 12 and set(source.read(0)[1]) <= {"seg", "pose", "mlsd"}
    check_union_data(TrainConfig(data=DataConfig(path=str(out)), model=ModelConfig(architecture="union")))
