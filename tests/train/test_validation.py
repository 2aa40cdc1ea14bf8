"""Validation: fidelity against ground truth, the sudden-convergence step, early stop, the report."""

from __future__ import annotations

import json

from train_helpers import tiny_config
from train_tiny import make_tiny_base

from controlnet.train import validation as val
from controlnet.train.report import svg_chart


def test_convergence_is_the_first_step_from_which_fidelity_stays_above_threshold():
    history = [(100, 0.2), (200, 0.85), (300, 0.6), (400, 0.82), (500, 0.9)]
    assert val.convergence_step(history, 0.8) == 400
    assert val.convergence_step(history[:3], 0.8) is None
    assert val.should_stop_early(history, 0.8, patience=2)
    assert not val.should_stop_early(history[:4], 0.8, patience=2)


def test_validation_logs_floor_ceiling_and_fidelity_and_early_stops(fill_data, tmp_path):
    from controlnet.train.trainer import train

    config = tiny_config(
        fill_data,
        tmp_path / "run",
        train__max_steps=6,
        validation__every=2,
        validation__num_samples=3,
        validation__steps=2,
        validation__threshold=0.0,
        validation__early_stop=True,
        validation__patience=2,
    )
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


def test_validation_generates_and_scores_with_evaluates_functions():
    """Training measures a net exactly as `controlnet evaluate` does: one implementation, in evaluate/."""
    from controlnet.evaluate.heldout import generate_images
    from controlnet.evaluate.report import score_by_name

    assert val.generate is generate_images and val.score is score_by_name
