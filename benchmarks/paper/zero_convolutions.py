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

On the built-in transformer base (`--base builtin-dit`, SD3's MMDiT layout) the same two connection arms on its
transformer ControlNet, whose zero-initialised layers are the Linear after each copied block (`controlnet_blocks`)
and the projection of the condition latents' patch embedding (`pos_embed_input.proj`); the Gaussian arm gives them
N(0, 1/fan_in) weights. The nets train by the demo's transformer recipe on the same fill data (common.py
`dit_fill_recipe`). There is no lite arm: ControlNet-lite (paper Fig. 8c) replaces the trainable copy of a UNet's
encoder by one conv per encoder block and has no transformer counterpart. Results: results/zero_convolutions-dit.*.

    python benchmarks/paper/zero_convolutions.py         # ~14 minutes on 2 cores
    python benchmarks/paper/zero_convolutions.py --base builtin-dit
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
    DIT,
    add_base_flag,
    curves_figure,
    generate,
    mean_score,
    parse_args,
    result_name,
    train_fill,
    validation_curve,
    write_results,
)

from controlnet.evaluate.fill import fill_iou  # noqa: E402
from controlnet.evaluate.heldout import heldout_set  # noqa: E402
from controlnet.train.demo import DIT_DEMO_RECIPE  # noqa: E402

# arm -> the training flags that make it (the run names of the first two arms are those of earlier runs, reused)
ARMS = {
    "zero": ("fill-zero-connections", ["--model.connection_init", "zero"]),
    "gaussian": ("fill-gaussian-connections", ["--model.connection_init", "gaussian"]),
    "lite": ("fill-lite-zero-connections", ["--model.architecture", "lite"]),
}
# on builtin-dit: its own runs, the same two connection arms (no lite: ControlNet-lite is defined on a UNet encoder)
# run names carry the recipe's lr and steps (still being tuned: a changed recipe gets new runs, not old ones reused)
_DIT = f"lr{DIT_DEMO_RECIPE['lr']:g}-{DIT_DEMO_RECIPE['steps']}steps"
DIT_ARMS = {
    "zero": (f"dit-fill-zero-connections-{_DIT}", ["--model.connection_init", "zero"]),
    "gaussian": (f"dit-fill-gaussian-connections-{_DIT}", ["--model.connection_init", "gaussian"]),
}
ARM_NAMES = {"zero": "zero convolutions", "gaussian": "Gaussian connections", "lite": "ControlNet-lite"}
DIT_ARM_NAMES = {"zero": "zero-initialised connections", "gaussian": "Gaussian connections"}
NO_LITE = (
    "No ControlNet-lite row: ControlNet-lite (paper Fig. 8c) replaces the trainable copy of a UNet's encoder by one "
    "conv layer per encoder block; a transformer ControlNet has no such encoder, so that arm does not apply."
)
VALIDATE_EVERY = "100"


def fresh_net(base, arm: str):
    """The net a training run of `arm` starts from (train.seed 0), on `base` (a UNet or an SD3 transformer base)."""
    from controlnet.model.ablations import gaussian_connections
    from controlnet.model.controlnet import ControlNet
    from controlnet.model.lite import ControlNetLite

    torch.manual_seed(0)  # as the trainer seeds a fresh net (train.seed 0)
    if getattr(base, "arch", "unet") != "unet":  # the trainer's transformer net: all joint blocks but the last
        from controlnet.model.transformer_controlnet import SD3ControlNet

        n = len(base.transformer.transformer_blocks)
        net = SD3ControlNet.from_transformer(base.transformer, num_layers=n - 1)
    else:
        architecture = ControlNetLite if arm == "lite" else ControlNet
        net = architecture.from_unet(
            base.unet, hint_block_channels=(4, 8, 16), hint_downscale_factor=base.vae_scale_factor
        )
    if arm == "gaussian":
        gaussian_connections(net, seed=0)
    return net.eval()


def main() -> int:
    args = parse_args(__doc__, n=50, extra=add_base_flag)
    started = time.time()
    from controlnet.generate.base import load_base
    from controlnet.generate.pipeline import ControlNetPipeline
    from controlnet.io.api import load_controlnet

    dit = args.base == DIT
    arms, names = (DIT_ARMS, DIT_ARM_NAMES) if dit else (ARMS, ARM_NAMES)
    held = heldout_set("fill", args.n, size=64)
    base = load_base(args.base)
    if dit:  # a transformer pipeline needs a net: the floor is a fresh net's residuals times 0 (the base alone)
        floor_pipe = ControlNetPipeline.from_components(base, [fresh_net(base, "zero")])
        floor = generate(floor_pipe, held.prompts, [held.conditions], args, control_scale=0.0)
    else:
        floor = generate(ControlNetPipeline.from_components(base, []), held.prompts, [], args)

    def run(arm: str):
        name, flags = arms[arm]
        return train_fill(name, [*flags, "--validation.every", VALIDATE_EVERY], threads=1, base=args.base)

    with ThreadPoolExecutor(2) as pool:  # one training process per arm, one thread each, two at a time
        runs = dict(zip(arms, pool.map(run, arms), strict=True))
    rows, curves = [], {}
    for arm in arms:
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
                "arm": names[arm],
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
        if dit:
            return curves_figure(plt, curves, "zero vs Gaussian connection layers on builtin-dit (fill task)")
        return curves_figure(plt, curves, "zero vs Gaussian connection layers vs ControlNet-lite (fill task)")

    name = result_name("zero_convolutions", args.base)
    notes = NO_LITE if dit else ""
    write_results(name, args, rows, columns, started, figure, notes=notes, script="zero_convolutions.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
