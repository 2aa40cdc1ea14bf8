"""CLI: `controlnet evaluate CONTROLNET` scores a ControlNet on a held-out world set, like the paper's Table 2.

For each held-out condition the ControlNet's image is re-detected by the task's fidelity metric; the floor is
the same base without control on the same prompts, the ceiling the ground-truth images through the same metric.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from controlnet.generate.commands import add_base_arguments

DEFAULT_HELDOUT = 50


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score how faithfully a ControlNet follows its condition (model vs floor vs ceiling)",
        description="Generate images for held-out conditions of the built-in world, re-detect the condition in "
        "each image with the task's fidelity metric (e.g. filled-disk IoU, edge F1, cluster mIoU) and print the "
        "ControlNet's score beside the floor (the base model alone on the same prompts) and the ceiling (the "
        "ground-truth images through the same metric), as in the paper's Table 2.",
    )
    p.add_argument(
        "controlnet", type=Path, help="the ControlNet to score (original or diffusers format, or builtin:NAME)"
    )
    p.add_argument("--task", default="fill", help="world task the ControlNet was trained on (default: fill)")
    p.add_argument(
        "--control-type",
        metavar="TYPE",
        help="a union ControlNet's condition type, by name or id (default: the --task's, e.g. seg -> segment)",
    )
    add_base_arguments(p.add_argument_group("base model (as `controlnet generate`)"))
    p.add_argument("--n", type=int, default=DEFAULT_HELDOUT, help=f"held-out samples (default: {DEFAULT_HELDOUT})")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default: 20)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (default: 3.0)")
    p.add_argument("--seed", type=int, default=0, help="image k is drawn from seed + k (default: 0)")
    p.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from controlnet.evaluate.heldout import evaluate_generator, generate_images, heldout_set
    from controlnet.generate.commands import DTYPES, base_options, loading_bar
    from controlnet.generate.pipeline import ControlNetPipeline
    from controlnet.model.union_controlnet import UnionControlNet
    from controlnet.world.dataset import UNION_TYPE_NAMES

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    from controlnet.generate.base import check_base, controlnet_path

    controlnet = controlnet_path(args.controlnet)  # "builtin:NAME" or a path

    source = check_base(args.base, **base_options(args))
    pipe = ControlNetPipeline.from_pretrained(
        source,
        controlnets=[controlnet],
        dtype=getattr(torch, DTYPES[args.dtype]),
        ema=args.ema,
        progress=loading_bar(),
        **base_options(args),
    )
    size = pipe.native_size  # the base's native resolution
    heldout = heldout_set(args.task, args.n, size=size)
    settings = {"steps": args.steps, "guidance_scale": args.cfg, "seed": args.seed}
    if args.control_type is not None or isinstance(pipe.controlnets[0], UnionControlNet):
        # the world's task names are union type names (world/dataset.py UNION_TYPE_NAMES: lines -> mlsd); a plain
        # net given a type is refused by the pipeline, in one line
        settings["control_type"] = args.control_type or UNION_TYPE_NAMES.get(args.task, args.task)

    def controlled(prompts, conditions):
        return generate_images(pipe, prompts, conditions, **settings)

    floor_pipe = copy.copy(pipe)  # same base modules, no ControlNet: the floor of the paper's comparison
    floor_pipe.controlnets = []

    def floor(prompts):
        return generate_images(floor_pipe, prompts, [], **settings)

    if source.arch != "unet":  # diffusers' SD3/Flux ControlNet pipelines need a net: the same at strength 0 is the
        # base alone (tests/builtin/test_dit_quality.py: equal pixels to StableDiffusion3Pipeline's)
        def floor(prompts):
            blank = [np.zeros((size, size, 3), np.uint8)] * len(prompts)
            return generate_images(pipe, prompts, blank, control_scale=0.0, **settings)

    elif "control_type" in settings:

        def floor(prompts):  # no net: no type
            return generate_images(
                floor_pipe, prompts, [], **{k: v for k, v in settings.items() if k != "control_type"}
            )

    report = evaluate_generator(heldout, controlled, floor)
    print(report.table())
    if args.json:
        rows = [
            {
                "metric": r.metric,
                "model": r.model,
                "floor": r.floor,
                "ceiling": r.ceiling,
                "gap_closed": r.gap_closed,
            }
            for r in report.rows
        ]
        args.json.write_text(json.dumps({"task": report.task, "n": report.n, "rows": rows, **settings}, indent=2))
    return 0
