"""train.log_with: the same numbers as metrics.jsonl reach accelerate's trackers (TensorBoard event files here)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from train_helpers import tiny_config
from train_tiny import make_tiny_base

from controlnet.train.trainer import LOGS_DIR, train


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the TensorBoard event files under `log_dir`, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return series


def test_tensorboard_receives_the_losses_and_fidelities_of_metrics_jsonl(fill_data, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    config = tiny_config(
        fill_data,
        run,
        train__log_with="tensorboard",
        validation__every=2,
        validation__num_samples=3,
        validation__steps=2,
    )
    train(config, make_tiny_base())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(e["step"], e["loss"]) for e in lines if "loss" in e]
    fidelities = [(e["step"], e["fidelity"]) for e in lines if e.get("event") == "validation"]
    assert [s for s, _ in losses] == [1, 2, 3, 4] and [s for s, _ in fidelities] == [2, 4]

    scalars = _scalars(run / LOGS_DIR)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    for (_, logged), (_, expected) in zip(scalars["train/loss"], losses, strict=True):
        assert logged == pytest.approx(expected, rel=1e-6)  # TensorBoard stores float32
    assert [s for s, _ in scalars["validation/fidelity"]] == [2, 4]
    for (_, logged), (_, expected) in zip(scalars["validation/fidelity"], fidelities, strict=True):
        assert logged == pytest.approx(expected, rel=1e-6)
    assert "train/lr" in scalars and "validation/floor" in scalars and "validation/ceiling" in scalars


def test_an_unknown_or_missing_tracker_is_refused_by_name_before_training(fill_data, tmp_path):
    with pytest.raises(ValueError, match="train.log_with='tensorbord': expected one of tensorboard"):
        tiny_config(fill_data, tmp_path / "run", train__log_with="tensorbord")
    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here: no missing tracker to try")
    with pytest.raises(ValueError, match="train.log_with='mlflow' needs the 'mlflow' package"):
        train(tiny_config(fill_data, tmp_path / "run", train__log_with="mlflow"), make_tiny_base())
    assert not (tmp_path / "run").exists()  # refused before anything was written
