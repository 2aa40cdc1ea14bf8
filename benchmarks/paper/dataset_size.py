"""Claim (paper Sec. 4.3 and its discussion of training-set sizes): ControlNet training is robust to the dataset's
size: it learns the condition from small sets (<50k images, the paper shows 1k) and keeps improving with larger
ones, without the small set overfitting into broken images.

Three fill ControlNets for the built-in base by builtin:fill's recipe (MODEL_CARD.md: 1000 steps of batch 32,
lr 3e-3, EMA 0.99), identical but for the training set: 1000, 3000 or 10000 world fill samples (seed 0; the last 16
of each are its validation set). 1000 steps of 32 samples are 32 epochs of the 1k set and 3.2 of the 10k one. For
each, on 50 world held-out outlines (other seeds than any training set), 20 sampler steps, CFG 4:
- fidelity: filled-shape IoU (evaluate/fill.py);
- image quality, against the world's ground-truth image of each outline: mean |generated - truth| over pixels
  (0..255, lower is better) and the colour accuracy of the shape and the background named by the prompt
  (evaluate/fill.py fill_colour_accuracy);
- the validation curve (IoU every 100 steps on its own 16 held-out samples).
The trainings run side by side, one thread each, outside the repo and resumable.

    python benchmarks/paper/dataset_size.py          # ~15 minutes on 2 cores
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    curves_figure,
    generate,
    mean_score,
    parse_args,
    pipeline,
    positive_int,
    train_fill,
    validation_curve,
    world_data,
    write_results,
)

from controlnet.evaluate.fill import fill_colour_accuracy, fill_iou  # noqa: E402
from controlnet.evaluate.heldout import heldout_set  # noqa: E402

SIZES = (1000, 3000, 10000)
VALIDATE_EVERY = "100"


def train(size: int) -> Path:
    flags = ["--validation.every", VALIDATE_EVERY]
    return train_fill(f"fill-{size}-samples", flags, threads=1, data=world_data("fill", size))


def main() -> int:
    def own_flags(p):
        p.add_argument(
            "--parallel", type=positive_int, default=2, help="trainings at a time, 1 thread each (default: 2)"
        )

    args = parse_args(__doc__, n=50, extra=own_flags)
    started = time.time()
    for size in SIZES:  # the datasets first, one at a time (the world's writer uses every core)
        world_data("fill", size)
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        runs = dict(zip(SIZES, pool.map(train, SIZES), strict=True))
    held = heldout_set("fill", args.n, size=64)
    rows, curves = [], {}
    for size in SIZES:
        images = generate(pipeline([runs[size] / "final" / "controlnet"]), held.prompts, [held.conditions], args)
        curves[size] = validation_curve(runs[size])
        rows.append(
            {
                "training samples": size,
                "epochs in 1000 steps": f"{1000 * 32 / (size - 16):.1f}",
                **{f"val. IoU @{s}": v for s, v in curves[size] if s in (300, 500, 700)},
                "final IoU": mean_score(fill_iou, images, held.conditions),
                "mean abs. error to truth (0-255)": float(
                    np.mean(
                        [
                            np.abs(g.astype(np.int16) - t).mean()
                            for g, t in zip(images, held.ground_truth, strict=True)
                        ]
                    )
                ),
                "colour accuracy": mean_score(fill_colour_accuracy, images, held.conditions, held.prompts),
            }
        )
        print(rows[-1], flush=True)
    columns = [
        "training samples",
        "epochs in 1000 steps",
        "val. IoU @300",
        "val. IoU @500",
        "val. IoU @700",
        "final IoU",
        "mean abs. error to truth (0-255)",
        "colour accuracy",
    ]

    def figure(plt, rows):
        title = "fill ControlNets trained on 1k, 3k and 10k samples (same 1000 steps)"
        return curves_figure(plt, {f"{size} samples": curve for size, curve in curves.items()}, title)

    write_results("dataset_size", args, rows, columns, started, figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
