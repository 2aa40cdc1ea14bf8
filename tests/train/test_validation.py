"""Validation: fidelity against ground truth, the sudden-convergence step, early stop, the report."""

from __future__ import annotations

import json

import numpy as np
from train_helpers import tiny_config
from train_tiny import make_tiny_base

from controlnet.train import validation as val
from controlnet.train.report import svg_chart
from controlnet.world.fill import fill_sample


def test_fill_fidelity_is_high_for_ground_truth_and_low_for_a_blank_image():
    samples = [fill_sample(seed, 32) for seed in range(6)]
    truth = val.score("fill_iou", [s.image for s in samples], [s.conditions["fill"] for s in samples])
    blank = val.score(
        "fill_iou", [np.full_like(s.image, 90) for s in samples], [s.conditions["fill"] for s in samples]
    )
    assert min(truth) > 0.9 and max(blank) < 0.5


def test_convergence_is_the_first_step_from_which_fidelity_stays_above_threshold():
    history = [(100, 0.2), (200, 0.85), (300, 0.6), (400, 0.82), (500, 0.9)]
    assert val.convergence_step(history, 0.8) == 400
    assert val.convergence_step(history[:3], 0.8) is None
    assert val.should_stop_early(history, 0.8, patience=2)
    assert not val.should_stop_early(history[:4], 0.8, patience=2)


def test_validation_logs_floor_ceiling_and_fidelity_and_early_stops(fill_data, tmp_path):
    from controlnet.train.trainer import train

    config = tiny_config(fill_data, tmp_path / "run", train__max_steps=6, validation__every=2,
                         validation__num_samples=3, validation__steps=2, validation__threshold=0.0,
                         validation__early_stop=True, validation__patience=2)  # fmt: skip
    summary = train(config, make_tiny_base())
    # threshold 0: converged at the first validation, stopped after `patience` of them
    assert summary.status == "early_stop" and summary.step == 4 and summary.convergence_step == 2
    assert summary.ceiling > 0.9 and 0 <= summary.floor <= 1
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "floor_ceiling" and events[0]["metric"] == "fill_iou"
    assert [e["step"] for e in events if e.get("event") == "validation"] == [2, 4]
    report = (tmp_path / "run" / "report.html").read_text()
    assert report.count("<svg") == 2 and "sudden convergence at step <b>2</b>" in report
    assert (tmp_path / "run" / "samples" / "step-0000004.png").is_file()

    # running a run that stopped early again trains no further: it only exports and reports again
    again = train(config, make_tiny_base())
    assert again.status == "early_stop" and again.step == 4 and again.validation == summary.validation
    assert (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() == [json.dumps(e) for e in events]


def test_svg_chart_places_points_inside_the_frame():
    svg = svg_chart("t", {"a": ([(0, 0.0), (10, 1.0)], "#000")}, (0.0, 1.0))
    assert 'points="40.0,200.0 600.0,40.0"' in svg


def test_scene_tasks_use_the_world_metric_of_their_task():
    from controlnet.world.scene_sample import scene_sample

    sample = scene_sample(3, 64, conditions=("canny",))
    truth = val.score("task:canny", [sample.image], [sample.conditions["canny"]])[0]
    blank = val.score("task:canny", [np.zeros_like(sample.image)], [sample.conditions["canny"]])[0]
    assert truth > 0.8 and blank < 0.2
