"""Validating a union ControlNet during training (train/validation.py, train/union.py): each condition type alone on
the held-out samples that hold it, scored with its world task's metric; the mean drives convergence and early stop;
settings that cannot be validated are refused in one line before anything loads."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image
from test_trackers import _scalars
from test_union_training import make_union_dataset
from train_helpers import tiny_config
from train_tiny import make_tiny_base

from controlnet.train import validation as val
from controlnet.train.trainer import LOGS_DIR, Trainer, train
from controlnet.train.union import check_union_data
from controlnet.world.dataset import write_dataset

# Hough lines are named mlsd in a union dataset (world/dataset.py UNION_TYPE_NAMES), scored with the lines task
WORLD_TYPES = ("lines", "seg", "depth")
UNION_NAMES = {"depth": "depth", "mlsd": "lines", "seg": "seg"}  # the net's order: by union type id


@pytest.fixture(scope="module")
def world_union(tmp_path_factory):
    """12 world scenes at 32 px, each with a lines, seg and depth map (`controlnet world make --task union`)."""
    return write_dataset("union", 12, 32, tmp_path_factory.mktemp("world") / "union", workers=1, types=WORLD_TYPES)


def _config(data, out, **overrides):
    return tiny_config(data, out, model__architecture="union", **overrides)


def test_union_run_validates_each_type_alone_with_its_world_metric(world_union, tmp_path, monkeypatch):
    calls = []  # (control_type, number of conditions) of every validation generation

    def spy(pipe, prompts, conditions, *args, control_type=None, **kwargs):
        calls.append((control_type, len(conditions)))
        return generate(pipe, prompts, conditions, *args, control_type=control_type, **kwargs)

    generate = val.generate
    monkeypatch.setattr(val, "generate", spy)
    infos = []
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    config = _config(
        world_union,
        tmp_path / "run",
        train__max_steps=2,
        validation__every=1,
        validation__num_samples=3,
        validation__steps=2,
        validation__grid_samples=2,
        **({"train__log_with": "tensorboard"} if tensorboard else {}),
    )
    summary = train(config, make_tiny_base(), callback=infos.append)
    assert summary.status == "finished" and summary.step == 2
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    floor = next(e for e in events if e.get("event") == "floor_ceiling")
    assert floor["metric"] == "mean over types of depth task:depth, mlsd task:lines, seg task:seg"
    for key in ("floor", "ceiling"):
        assert floor[f"{key}_by_type"].keys() == UNION_NAMES.keys()
        assert floor[key] == pytest.approx(np.mean(list(floor[f"{key}_by_type"].values())))
    validations = [e for e in events if e.get("event") == "validation"]
    assert [e["step"] for e in validations] == [1, 2]
    for event in validations:
        by_type = event["fidelity_by_type"]
        assert by_type.keys() == UNION_NAMES.keys() and all(0 <= v <= 1 for v in by_type.values())
        assert event["fidelity"] == pytest.approx(np.mean(list(by_type.values())))
    # convergence and early stopping read the mean; the progress bar gets each type's beside it
    assert summary.validation == [(e["step"], e["fidelity"]) for e in validations]
    assert [(i.fidelity, i.fidelity_by_type) for i in infos] == [
        (e["fidelity"], e["fidelity_by_type"]) for e in validations
    ]
    # each type generated alone on the held-out samples that hold it; the floor (the base alone) takes no type
    held = [
        set(s) for s in (json.loads(x)["sources"] for x in (world_union / "prompt.json").read_text().splitlines())
    ]
    counts = {name: sum(name in h for h in held[-3:]) for name in UNION_NAMES}
    assert calls == [(None, n) for n in counts.values()] + [(name, n) for name, n in counts.items()] * 2
    grid = Image.open(tmp_path / "run" / "samples" / "step-0000002.png")
    assert grid.size == (2 * 16, 3 * 16)  # a row per type, validation.grid_samples columns
    if tensorboard:  # each type's fidelity as a series of its own
        scalars = _scalars(tmp_path / "run" / LOGS_DIR)
        logged = [v for _, v in scalars["validation/fidelity_by_type/mlsd"]]
        assert logged == pytest.approx([e["fidelity_by_type"]["mlsd"] for e in validations], rel=1e-6)


def _refusal(config) -> str:
    with pytest.raises(ValueError) as err:
        Trainer(config).setup()  # model.base builtin: nothing loads before the checks
    message = str(err.value)
    assert "\n" not in message
    return message


def test_union_validation_settings_it_cannot_score_are_refused_in_one_line(fill_data, world_union, tmp_path):
    plain = make_union_dataset(
        fill_data, tmp_path / "plain", n=10
    )  # canny + depth, no world.json; the last: canny
    message = _refusal(_config(plain, tmp_path / "a", validation__every=5))
    assert message.startswith("validation.every=5, validation.metric=auto: ")
    assert "no union world.json" in message and "controlnet world make --task union" in message
    (plain / "world.json").write_text(json.dumps({"task": "union", "types": ["canny"]}))
    message = _refusal(_config(plain, tmp_path / "b", validation__every=5))
    assert "a 'depth' type (its world.json names the types canny)" in message
    message = _refusal(_config(plain, tmp_path / "c", validation__every=5, validation__metric="task:union"))
    assert message.startswith("validation.every=5, validation.metric=task:union: ") and "no world task" in message
    message = _refusal(
        _config(
            plain, tmp_path / "d", validation__every=5, validation__metric="edge_f1", validation__num_samples=1
        )
    )
    assert message.startswith("validation.num_samples=1: ") and "'depth'" in message
    assert not any((tmp_path / name).exists() for name in "abcd")  # no run folder left behind
    # a named metric scores every type of data from anywhere; validation off needs no metric at all
    check_union_data(_config(plain, tmp_path / "e", validation__every=5, validation__metric="edge_f1"))
    (plain / "world.json").unlink()
    check_union_data(_config(plain, tmp_path / "f"))
    assert val.union_metrics(_config(world_union, tmp_path / "g"), ["depth", "mlsd"]) == {
        "depth": "task:depth",
        "mlsd": "task:lines",
    }
