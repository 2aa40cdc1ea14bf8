"""Claim (paper Sec. 3.4, Fig. 6 "multiple conditions"): ControlNets trained separately compose by adding their
outputs, with no retraining.

Two built-in ControlNets trained alone, `builtin:seg` and `builtin:pose`, applied to the same held-out scenes (each
with a person) through one pipeline that sums their residuals (model/compose.py). The two conditions carry
disjoint parts of the scene: the seg map is drawn with the person removed (a full seg map already holds the
person's silhouette: with it, seg alone scored pose F1 0.81, as high as pose alone, and composition would show
nothing), the pose map holds only the person. Fidelity to the whole scene: re-segmentation mIoU against the full
scene's seg map (person included) and stick-figure F1 against the skeleton, for each net alone, both together at
full strength and both at 0.5, beside the base alone.

    python benchmarks/paper/composition.py              # n 50, 20 steps, CFG 4
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import generate, image_strip, mean_score, parse_args, pipeline, without_control, write_results  # noqa: E402

from controlnet.evaluate.heldout import HELDOUT_SEED  # noqa: E402
from controlnet.evaluate.report import TASK_METRICS  # noqa: E402
from controlnet.world.dataset import sample_seed  # noqa: E402
from controlnet.world.scene import sample_scene  # noqa: E402
from controlnet.world.scene_sample import render_scene  # noqa: E402

SCENE_SEED = HELDOUT_SEED + 5  # held-out scenes of their own (no training set uses this stream)


def main() -> int:
    args = parse_args(__doc__, n=50)
    started = time.time()
    samples, seg_without_person = [], []
    for i in range(args.n):
        seed = sample_seed(SCENE_SEED, i)
        scene = sample_scene(seed, 64, require_person=True)
        samples.append(render_scene(scene, seed, ("seg", "pose")))
        others = dataclasses.replace(scene, objects=tuple(o for o in scene.objects if o.kind != "person"))
        seg_without_person.append(render_scene(others, seed, ("seg",)).conditions["seg"])
    prompts = [s.prompt for s in samples]
    seg = [s.conditions["seg"] for s in samples]  # the whole scene's: what the joint result is scored against
    pose = [s.conditions["pose"] for s in samples]
    seg_metric, pose_metric = TASK_METRICS["seg"][0], TASK_METRICS["pose"][0]
    both = pipeline(["seg", "pose"])
    seg_only, pose_only = pipeline(["seg"]), pipeline(["pose"])
    settings = {
        "base alone": (without_control(both), [], {}),
        "seg (no person) alone": (seg_only, [seg_without_person], {}),
        "pose alone": (pose_only, [pose], {}),
        "seg (no person) + pose": (both, [seg_without_person, pose], {}),
        "both at 0.5 each": (both, [seg_without_person, pose], {"control_scale": [0.5, 0.5]}),
    }
    rows = []
    shown = [
        ("seg condition (no person)", seg_without_person[:6]),
        ("pose condition", pose[:6]),
        ("ground truth", [s.image for s in samples[:6]]),
    ]
    for name, (pipe, conditions, options) in settings.items():
        images = generate(pipe, prompts, conditions, args, **options)
        row = {
            "setting": name,
            f"seg {seg_metric.name} (whole scene)": mean_score(seg_metric.fn, images, seg),
            f"pose {pose_metric.name}": mean_score(pose_metric.fn, images, pose),
        }
        rows.append(row)
        shown.append((name, images[:6]))
        print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else str(v) for k, v in row.items()), flush=True)
    columns = ["setting", f"seg {seg_metric.name} (whole scene)", f"pose {pose_metric.name}"]

    def figure(plt, rows):
        return image_strip(
            plt, shown, "seg + pose ControlNets trained apart, applied together (6 held-out scenes)"
        )

    write_results("composition", args, rows, columns, started, figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
