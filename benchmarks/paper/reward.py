"""Beyond the paper: ControlNet++'s consistency reward (Li et al., ECCV 2024; `--train.reward`, train/reward.py)
against a plain continuation of the diffusion loss, both fine-tuning a shipped built-in ControlNet for the same
number of steps.

1. Data: `--samples` world samples of the task (64 px, seed 0), latents cached once for both runs.
2. Two runs from builtin:TASK with the same seed, data order, noise and timesteps: plain (the paper's Eq. 5 alone)
   and reward (Eq. 5 + lambda * the detector loss on samples with t <= 200; `--weight`), each `--train-steps`
   optimizer steps, batch `--batch`, AdamW `--lr`, clip 1.0, no EMA; time per step from the trainer's callback.
3. On `--n` held-out world samples (20 sampler steps, CFG 4): the world's fidelity metric of the task
   (filled-shape IoU for fill, edge F1 for canny, class IoU for seg), the image error to the world's ground truth
   (mean absolute RGB error, 0..1), for the shipped net, both fine-tunes, the base alone (floor) and the ground truth
   (ceiling).

    python benchmarks/paper/reward.py --task fill                  # ~15 minutes on 2 shared cores
    python benchmarks/paper/reward.py --task fill --n 2 --steps 2 --train-steps 2 --samples 64   # a quick check
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, generate, mean_score, parse_args, positive_int, world_data, write_results  # noqa: E402

from controlnet.evaluate.heldout import heldout_set  # noqa: E402

TRAIN_STEPS, BATCH, LR, WEIGHT, SAMPLES = 60, 8, 1e-4, 0.5, 512
TASKS = ("fill", "canny", "seg")  # the built-in nets the reward has a detector for (pose has none)


def metric(task: str):
    """The world's fidelity metric of `task` (what `controlnet evaluate builtin:TASK --task TASK` reports)."""
    if task == "fill":
        from controlnet.evaluate.fill import fill_iou

        return "filled-shape IoU", fill_iou
    if task == "canny":
        from controlnet.evaluate.edges import canny_f1

        return "edge F1", canny_f1
    from controlnet.evaluate.regions import seg_miou

    return "class IoU", seg_miou


def image_error(images, truth) -> float:
    """Mean absolute RGB error (0..1) of generated images to the world's ground-truth images."""
    return float(
        np.mean(
            [
                np.abs(g.astype(np.float32) - t.astype(np.float32)).mean() / 255
                for g, t in zip(images, truth, strict=True)
            ]
        )
    )


def fine_tune(task: str, data: Path, reward: bool, args) -> tuple[Path, float]:
    """(the fine-tuned net's folder, mean seconds per optimizer step) of one run, in-process; a finished run is
    reused (its time per step from the first time it ran, kept in the run folder)."""
    from controlnet.train.config import resolve_config
    from controlnet.train.trainer import train

    name = f"reward-{task}-{'reward' if reward else 'plain'}-{args.train_steps}steps-b{args.batch}-w{args.weight}"
    run = WORK / "runs" / name
    timing = run / "step_seconds.txt"
    if (run / "final" / "controlnet").exists() and timing.exists():
        return run / "final" / "controlnet", float(timing.read_text())
    config = resolve_config(
        None,
        {
            "data.path": str(data),
            "data.resolution": "64",
            "data.cache_dir": str(WORK / "cache" / data.name),
            "model.base": "builtin",
            "model.controlnet": f"builtin:{task}",
            "optim.lr": str(args.lr),
            "optim.max_grad_norm": "1.0",
            "train.output_dir": str(run),
            "train.max_steps": str(args.train_steps),
            "train.batch_size": str(args.batch),
            "train.seed": str(args.seed),
            "train.threads": str(args.threads),
            "train.log_every": "10",
            "train.reward": str(reward).lower(),
            "train.reward_weight": str(args.weight),
            "checkpoint.every": "0",
            "checkpoint.export_formats": "diffusers",
        },
    )
    seconds: list[float] = []

    def on_step(info) -> None:
        seconds.append(info.step_seconds)
        if info.step % 10 == 0 or info.step == info.max_steps:
            print(
                f"{name}: step {info.step}/{info.max_steps} loss {info.loss:.4f} ({info.step_seconds:.2f} s/step)"
            )

    train(config, callback=on_step)
    per_step = float(np.mean(seconds[1:] if len(seconds) > 1 else seconds))  # the first step warms the allocator
    timing.write_text(f"{per_step}\n")
    return run / "final" / "controlnet", per_step


def main() -> int:
    def own_flags(p):
        p.add_argument("--task", choices=TASKS, default="fill", help="the built-in ControlNet to fine-tune (fill)")
        p.add_argument(
            "--train-steps", type=positive_int, default=TRAIN_STEPS, help=f"steps of each run ({TRAIN_STEPS})"
        )
        p.add_argument("--batch", type=positive_int, default=BATCH, help=f"training batch ({BATCH})")
        p.add_argument("--lr", type=float, default=LR, help=f"AdamW learning rate ({LR})")
        p.add_argument("--weight", type=float, default=WEIGHT, help=f"the reward's weight lambda ({WEIGHT})")
        p.add_argument("--samples", type=positive_int, default=SAMPLES, help=f"world training samples ({SAMPLES})")

    args = parse_args(__doc__, n=24, extra=own_flags)
    started = time.time()
    from controlnet.generate.base import check_base, controlnet_path, load_base
    from controlnet.generate.pipeline import ControlNetPipeline
    from controlnet.io.api import load_controlnet

    data = world_data(args.task, args.samples)
    plain, plain_s = fine_tune(args.task, data, False, args)
    rewarded, reward_s = fine_tune(args.task, data, True, args)
    base = load_base(check_base("builtin"))
    held = heldout_set(args.task, args.n, size=64)
    label, score = metric(args.task)
    settings = [
        ("base alone (floor)", None, None),
        (f"builtin:{args.task} (shipped)", controlnet_path(f"builtin:{args.task}"), None),
        (f"+ {args.train_steps} steps plain (Eq. 5)", plain, plain_s),
        (f"+ {args.train_steps} steps with the reward (lambda {args.weight})", rewarded, reward_s),
    ]
    rows = []
    for name, path, per_step in settings:
        nets = [] if path is None else [load_controlnet(path, unet=base.unet).eval()]
        pipe = ControlNetPipeline.from_components(base, nets)
        images = generate(pipe, held.prompts, [held.conditions] * len(nets), args)
        rows.append(
            {
                "setting": name,
                label: mean_score(score, images, held.conditions),
                "image error to truth": image_error(images, held.ground_truth),
                "s / training step": per_step if per_step is not None else "",
            }
        )
        print(rows[-1], flush=True)
    rows.append(
        {
            "setting": "ground truth (ceiling)",
            label: mean_score(score, held.ground_truth, held.conditions),
            "image error to truth": 0.0,
        }
    )
    notes = (
        f"task {args.task}; {args.samples} world training samples; batch {args.batch}, lr {args.lr}, "
        f"{args.train_steps} steps per run, reward weight {args.weight}, t <= 200 of 1000"
    )
    write_results(
        f"reward-{args.task}",
        args,
        rows,
        ["setting", label, "image error to truth", "s / training step"],
        started,
        notes=notes,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
