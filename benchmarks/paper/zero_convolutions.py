"""Claim (paper Sec. 3.1; ablation, Fig. 8): zero convolutions protect the pretrained model at the start of training
and train better than connection layers with an ordinary Gaussian initialisation; and the trainable copy matters:
ControlNet-lite (one conv layer per encoder block) follows the condition less.

Three fresh nets for the built-in base, identical but for one flag: `--model.connection_init` zero | gaussian
(model/ablations.py: N(0, 1/fan_in) weights), and `--model.architecture lite` (model/lite.py, zero connections).
For each:
- the change of the base's output at step 0: mean |image with the fresh net - image of the base alone| (0..255) on
  held-out fill outlines, same prompts, seeds and sampler;
- the fidelity curve while training by builtin:fill's recipe (MODEL_CARD.md; validation every 100 steps here) and
  the final filled-shape IoU on the held-out set;
- trainable parameters.
The trainings run two at a time, one thread each (2 cores), outside the repo and resumable.

    python benchmarks/paper/zero_convolutions.py         # ~14 minutes on 2 cores
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    curves_figure,
    generate,
    mean_score,
    parse_args,
    train_fill,
    validation_curve,
    write_results,
)

from controlnet.evaluate.fill import fill_iou  # noqa: E402
from controlnet.evaluate.heldout import heldout_set  # noqa: E402

# arm -> the training flags that make it (the run names of the first two arms are those of earlier runs, reused)
ARMS = {
    "zero": ("fill-zero-connections", ["--model.connection_init", "zero"]),
    "gaussian": ("fill-gaussian-connections", ["--model.connection_init", "gaussian"]),
    "lite": ("fill-lite-zero-connections", ["--model.architecture", "lite"]),
}
VALIDATE_EVERY = "100"


def fresh_net(base, arm: str):
    from controlnet.model.ablations import gaussian_connections
    from controlnet.model.controlnet import ControlNet
    from controlnet.model.lite import ControlNetLite

    torch.manual_seed(0)  # as the trainer seeds a fresh net (train.seed 0)
    architecture = ControlNetLite if arm == "lite" else ControlNet
    net = architecture.from_unet(
        base.unet, hint_block_channels=(4, 8, 16), hint_downscale_factor=base.vae_scale_factor
    )
    if arm == "gaussian":
        gaussian_connections(net, seed=0)
    return net.eval()


def main() -> int:
    args = parse_args(__doc__, n=50)
    started = time.time()
    from controlnet.generate.base import load_base
    from controlnet.generate.pipeline import ControlNetPipeline
    from controlnet.io.api import load_controlnet

    held = heldout_set("fill", args.n, size=64)
    base = load_base("builtin")
    floor = generate(ControlNetPipeline.from_components(base, []), held.prompts, [], args)

    def run(arm: str):
        name, flags = ARMS[arm]
        return train_fill(name, [*flags, "--validation.every", VALIDATE_EVERY], threads=1)

    with ThreadPoolExecutor(2) as pool:  # one training process per arm, one thread each, two at a time
        runs = dict(zip(ARMS, pool.map(run, ARMS), strict=True))
    rows, curves = [], {}
    for arm in ARMS:
        net = fresh_net(base, arm)
        at_start = generate(ControlNetPipeline.from_components(base, [net]), held.prompts, [held.conditions], args)
        change = float(
            np.mean([np.abs(a.astype(np.int16) - b).mean() for a, b in zip(at_start, floor, strict=True)])
        )
        trained = load_controlnet(runs[arm] / "final" / "controlnet", unet=base.unet).eval()
        images = generate(
            ControlNetPipeline.from_components(base, [trained]), held.prompts, [held.conditions], args
        )
        curves[arm] = validation_curve(runs[arm])
        rows.append(
            {
                "arm": {
                    "zero": "zero convolutions",
                    "gaussian": "Gaussian connections",
                    "lite": "ControlNet-lite",
                }[arm],
                "output change at step 0": change,
                "IoU at step 0": mean_score(fill_iou, at_start, held.conditions),
                **{f"val. IoU @{s}": v for s, v in curves[arm] if s in (200, 500, 800)},
                "final IoU": mean_score(fill_iou, images, held.conditions),
                "trainable parameters": sum(p.numel() for p in net.parameters()),
            }
        )
        print(rows[-1], flush=True)
    rows.insert(
        0,
        {
            "arm": "base alone (floor)",
            "output change at step 0": 0.0,
            "final IoU": mean_score(fill_iou, floor, held.conditions),
        },
    )
    columns = [
        "arm",
        "output change at step 0",
        "IoU at step 0",
        "val. IoU @200",
        "val. IoU @500",
        "val. IoU @800",
        "final IoU",
        "trainable parameters",
    ]

    def figure(plt, rows):
        return curves_figure(plt, curves, "zero vs Gaussian connection layers vs ControlNet-lite (fill task)")

    write_results("zero_convolutions", args, rows, columns, started, figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
