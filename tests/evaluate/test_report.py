import numpy as np
import pytest

from controlnet.evaluate.report import (
    TASK_METRICS,
    Report,
    Row,
    evaluate_images,
    format_table,
    score_by_name,
    score_images,
)
from controlnet.world.dataset import TASKS
from controlnet.world.fill import fill_sample
from controlnet.world.scene_sample import scene_sample


def test_every_world_task_has_a_metric():
    assert set(TASK_METRICS) == set(TASKS)


def test_gap_closed_by_hand():
    assert Row("m", model=0.5, floor=0.2, ceiling=0.8).gap_closed == pytest.approx(0.5)
    assert np.isnan(Row("m", model=0.5, floor=0.3, ceiling=0.3).gap_closed)


def test_evaluate_images_orders_floor_model_ceiling():
    samples = [scene_sample(i) for i in range(8)]
    conditions = [s.conditions["depth"] for s in samples]
    truth = [s.image for s in samples]
    model = [np.roll(s.image, 2, axis=1) for s in samples]  # nearly right
    floor = [samples[(i + 3) % 8].image for i in range(8)]  # other scenes: the prompt alone
    report = evaluate_images("depth", model, conditions, truth, floor)
    assert [row.metric for row in report.rows] == ["silhouette IoU", "layer mIoU"]
    for row in report.rows:
        assert row.floor < row.model < row.ceiling
        assert 0 < row.gap_closed < 1
    table = report.table()
    assert "silhouette IoU" in table and "depth" in table and f"{report.rows[0].ceiling:.3f}" in table


def test_fill_report_needs_prompts_and_has_three_rows():
    samples = [fill_sample(i) for i in range(6)]
    conditions = [s.conditions["fill"] for s in samples]
    images = [s.image for s in samples]
    with pytest.raises(ValueError, match="prompts"):
        evaluate_images("fill", images, conditions, images, images)
    report = evaluate_images("fill", images, conditions, images, images[::-1], prompts=[s.prompt for s in samples])
    assert [r.metric for r in report.rows] == ["disk IoU", "colour accuracy", "colour error"]
    assert report.rows[0].ceiling > 0.99 and report.rows[0].floor < 0.6
    assert "lower is better" in format_table([report])


def test_score_images_validates():
    with pytest.raises(ValueError, match="task"):
        score_images("hed", [], [])
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="images"):
        score_images("canny", [image], [image, image])
    with pytest.raises(ValueError, match="conditions"):
        evaluate_images("canny", [], [], [], [])
    assert isinstance(Report("canny", 0, ()).table(), str)


def test_fill_fidelity_is_high_for_ground_truth_and_low_for_a_blank_image():
    samples = [fill_sample(seed, 32) for seed in range(6)]
    truth = score_by_name("fill_iou", [s.image for s in samples], [s.conditions["fill"] for s in samples])
    blank = score_by_name(
        "fill_iou", [np.full_like(s.image, 90) for s in samples], [s.conditions["fill"] for s in samples]
    )
    assert min(truth) > 0.9 and max(blank) < 0.5


def test_scene_tasks_use_the_world_metric_of_their_task():
    sample = scene_sample(3, 64, conditions=("canny",))
    truth = score_by_name("task:canny", [sample.image], [sample.conditions["canny"]])[0]
    blank = score_by_name("task:canny", [np.zeros_like(sample.image)], [sample.conditions["canny"]])[0]
    assert truth > 0.8 and blank < 0.2


def test_metric_names_are_checked():
    with pytest.raises(ValueError, match=r"metric='task:nope': no world task 'nope'"):
        score_by_name("task:nope", [], [])
    with pytest.raises(ValueError, match=r"metric='psnr': expected fill_iou, edge_f1 or task:NAME"):
        score_by_name("psnr", [], [])
