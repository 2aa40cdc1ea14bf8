"""Beyond the paper: ControlNet++'s consistency reward (Li et al., ECCV 2024; `--train.reward`, train/reward.py)
against a plain continuation of the diffusion loss, both fine-tuning a shipped built-in ControlNet for the same
number of steps.

1. Data: `--samples` world samples of the task (64 px, seed 0), latents cached once for every run.
2. Runs from builtin:TASK with the same seed, data order, noise and timesteps: plain (the paper's Eq. 5 alone) and,
   for each `--variants` entry T:W, the reward (Eq. 5 + W * the detector loss on samples with t <= T of 1000;
   ControlNet++: T = 200), each `--train-steps` optimizer steps, batch `--batch`, AdamW `--lr`, clip 1.0, no EMA;
   time per step from the trainer's callback.
3. On `--n` held-out world samples (20 sampler steps, CFG 4), for the shipped net, every fine-tune, the base alone
   (floor) and the ground truth (ceiling): the world's fidelity metric of the task (filled-shape IoU, edge F1, class
   IoU, stick-figure F1), the image error to the world's ground truth (mean absolute RGB error, 0..1), and KID x 1000
   to the ground truth on the world's own image statistics (evaluate/distribution.py; "another draw of the world"
   is its noise level).
4. What the reward's detector sees: the fidelity of the ONE-STEP prediction x0'(x_t, t) (the reward's input,
   decoded) of the held-out ground truth noised to t, for each net, beside the VAE round trip of the truth (the
   best any latent image can score). Written as reward-TASK-onestep.

    python benchmarks/paper/reward.py --task fill --variants 200:0.5,1000:0.5     # ~25 minutes on 2 cores
    python benchmarks/paper/reward.py --task fill --n 2 --steps 2 --train-steps 2 --samples 64   # a quick check
    python benchmarks/paper/reward.py --task seg --train-only      # the runs alone (resumable: finished runs are reused)
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    WORK,
    generate,
    image_strip,
    mean_score,
    parse_args,
    positive_int,
    save_figure,
    world_data,
    write_results,
)

from controlnet.evaluate.heldout import HELDOUT_SEED, heldout_set  # noqa: E402

TRAIN_STEPS, BATCH, LR, SAMPLES = 300, 16, 1e-4, 2000
PAPER_VARIANT = "200:0.5"  # ControlNet++'s threshold t <= 200 of 1000; our default weight lambda
TASKS = ("fill", "canny", "seg", "pose")  # the built-in nets, each with a detector (train/detectors.py)
ONESTEP_TIMESTEPS = (50, 200, 400, 600, 800, 999)
FIGURE_SAMPLES = 8


def metric(task: str):
    """(label, score(image, condition)): the world's fidelity metric of `task`, as `controlnet evaluate` scores it."""
    if task == "fill":
        from controlnet.evaluate.fill import fill_iou

        return "filled-shape IoU", fill_iou
    if task == "canny":
        from controlnet.evaluate.edges import canny_f1

        return "edge F1", canny_f1
    if task == "pose":
        from controlnet.evaluate.pose import pose_overlap

        return "stick-figure F1", pose_overlap
    from controlnet.evaluate.regions import seg_miou

    return "class IoU", seg_miou


def parse_variants(text: str) -> list[tuple[int, float]]:
    """ "200:0.5,1000:0.5" -> [(200, 0.5), (1000, 0.5)]: the reward's threshold (of 1000) and weight per run."""
    variants = []
    for item in text.split(","):
        try:
            threshold, weight = item.split(":")
            variants.append((int(threshold), float(weight)))
        except ValueError:
            raise SystemExit(
                f"--variants {text!r}: expected THRESHOLD:WEIGHT pairs, e.g. 200:0.5,1000:0.5"
            ) from None
        if not 0 < variants[-1][0] <= 1000 or not variants[-1][1] > 0:
            raise SystemExit(f"--variants {item!r}: expected a threshold in 1..1000 and a weight > 0")
    return variants


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


def _paired(scores: np.ndarray, plain: np.ndarray | None) -> str:
    """The mean per-sample fidelity difference to the plain run on the same held-out samples and seeds, ± twice its
    standard error: a gain is told from sampling noise when the interval excludes 0."""
    if plain is None or len(scores) < 2:
        return ""
    diff = scores - plain
    return f"{diff.mean():+.3f} ± {2 * diff.std(ddof=1) / np.sqrt(len(diff)):.3f}"


def fine_tune(task: str, data: Path, variant: tuple[int, float] | None, args) -> tuple[Path, float]:
    """(the fine-tuned net's folder, mean seconds per optimizer step) of one run (`variant` None: plain), in-process;
    a finished run is reused (its time per step from the first time it ran, kept in the run folder)."""
    from controlnet.train.config import resolve_config
    from controlnet.train.trainer import train

    kind = "plain" if variant is None else f"reward-t{variant[0]}-w{variant[1]}"
    name = f"reward-{task}-{kind}-{args.train_steps}steps-b{args.batch}-n{args.samples}"
    if args.start:  # another starting net: its own runs (the folder's name, its path's digest)
        name += f"-from-{Path(args.start).name}-{hashlib.sha1(str(Path(args.start).resolve()).encode()).hexdigest()[:8]}"
    run = WORK / "runs" / name
    timing = run / "step_seconds.txt"
    if (run / "final" / "controlnet").exists() and timing.exists():
        return run / "final" / "controlnet", float(timing.read_text())
    reward = {} if variant is None else {"train.reward_max_timestep": str(variant[0])}
    config = resolve_config(
        None,
        {
            "data.path": str(data),
            "data.resolution": "64",
            "data.cache_dir": str(WORK / "cache" / data.name),
            "model.base": "builtin",
            "model.controlnet": args.start or f"builtin:{task}",
            "optim.lr": str(args.lr),
            "optim.max_grad_norm": "1.0",
            "train.output_dir": str(run),
            "train.max_steps": str(args.train_steps),
            "train.batch_size": str(args.batch),
            "train.seed": str(args.seed),
            "train.threads": str(args.threads),
            "train.log_every": "10",
            "train.reward": str(variant is not None).lower(),
            "train.reward_weight": str(variant[1] if variant else 0.5),
            **reward,
            "checkpoint.every": "100",
            "checkpoint.export_formats": "diffusers",
        },
    )
    seconds: list[float] = []

    def on_step(info) -> None:
        seconds.append(info.step_seconds)
        if info.step % 50 == 0 or info.step == info.max_steps:
            print(
                f"{name}: step {info.step}/{info.max_steps} loss {info.loss:.4f} ({info.step_seconds:.2f} s/step)"
            )

    train(config, callback=on_step)  # resumes from the run's newest checkpoint after an interruption
    per_step = float(np.median(seconds)) if seconds else float("nan")  # the median: robust to a loaded machine
    timing.write_text(f"{per_step}\n")
    return run / "final" / "controlnet", per_step


@torch.inference_mode()
def onestep_scores(pipe, held, score, timesteps=ONESTEP_TIMESTEPS, seed: int = 0) -> dict[str, float]:
    """The fidelity of the reward's input: the decoded one-step x0'(x_t, t) of the held-out truth noised to each t
    (noise drawn from `seed`), conditional (no CFG), as train/reward.py computes it; and the VAE round trip."""
    from diffusers import DDPMScheduler

    from controlnet.model.controlled_unet import ControlledUNet
    from controlnet.train.reward import predict_x0

    def to_uint8(pixels):  # (N, 3, H, W) in [-1, 1] -> list of (H, W, 3) uint8
        unit = (pixels.float() / 2 + 0.5).clamp(0, 1)
        return list((unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    model = ControlledUNet(pipe.controlnets[0], pipe.unet)
    context = pipe._encode(list(held.prompts), None, False, 0)[0].context  # (N, L, D)
    truth = torch.from_numpy(np.stack(held.ground_truth)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W)
    x0 = torch.cat([pipe._encode_image(t[None]) for t in truth])  # (N, C, h, w)
    cond = torch.from_numpy(np.stack(held.conditions)).permute(0, 3, 1, 2).float() / 255
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    scores = {"VAE round trip": mean_score(score, to_uint8(pipe._decode(x0)), held.conditions)}
    for t in timesteps:
        steps = torch.full((len(x0),), t)
        noisy = scheduler.add_noise(x0, noise, steps)
        x0_pred = predict_x0(model(noisy, steps, context, cond), noisy, scheduler.alphas_cumprod[steps], "epsilon")
        scores[f"t={t}"] = mean_score(score, to_uint8(pipe._decode(x0_pred)), held.conditions)
    return scores


def main() -> int:
    def own_flags(p):
        p.add_argument("--task", choices=TASKS, default="fill", help="the built-in ControlNet to fine-tune (fill)")
        p.add_argument(
            "--train-steps", type=positive_int, default=TRAIN_STEPS, help=f"steps of each run ({TRAIN_STEPS})"
        )
        p.add_argument("--batch", type=positive_int, default=BATCH, help=f"training batch ({BATCH})")
        p.add_argument("--lr", type=float, default=LR, help=f"AdamW learning rate ({LR})")
        p.add_argument(
            "--variants",
            default=PAPER_VARIANT,
            help=f"reward runs as THRESHOLD:WEIGHT, comma-separated (default {PAPER_VARIANT}: ControlNet++'s t <= 200)",
        )
        p.add_argument("--samples", type=positive_int, default=SAMPLES, help=f"world training samples ({SAMPLES})")
        p.add_argument("--train-only", action="store_true", help="train the runs and stop (no evaluation)")
        p.add_argument(
            "--start",
            default="",
            help="the ControlNet to fine-tune (default: builtin:TASK, the shipped one; the docs' tables started from "
            "the nets shipped at commit 3c9b357, before builtin:pose became its reward fine-tune)",
        )

    args = parse_args(__doc__, n=100, extra=own_flags)
    variants = parse_variants(args.variants)
    started = time.time()
    from controlnet.evaluate.distribution import kid
    from controlnet.generate.base import check_base, controlnet_path, load_base
    from controlnet.generate.pipeline import ControlNetPipeline
    from controlnet.io.api import load_controlnet

    data = world_data(args.task, args.samples)
    runs = [("plain (Eq. 5)", *fine_tune(args.task, data, None, args))]
    for threshold, weight in variants:
        label = f"reward, t <= {threshold}, lambda {weight}"
        runs.append((label, *fine_tune(args.task, data, (threshold, weight), args)))
    if args.train_only:
        return 0

    base = load_base(check_base("builtin"))
    held = heldout_set(args.task, args.n, size=64)
    other_draw = heldout_set(args.task, args.n, size=64, seed=HELDOUT_SEED + 1).ground_truth
    label, score = metric(args.task)
    kid_label = "KID x 1000 to truth"
    plain_name = f"+ {args.train_steps} steps, {runs[0][0]}"
    settings = [
        ("base alone (floor)", None, None),
        (
            f"{args.start} (start)" if args.start else f"builtin:{args.task} (shipped)",
            controlnet_path(args.start or f"builtin:{args.task}"),
            None,
        ),
        *[(f"+ {args.train_steps} steps, {name}", path, per_step) for name, path, per_step in runs],
    ]
    rows, onestep, samples = [], [], [("condition", held.conditions), ("ground truth", held.ground_truth)]
    per_sample: dict[str, np.ndarray] = {}
    paired = "vs plain: paired mean difference ± 2 SE"
    for name, path, per_step in settings:
        nets = [] if path is None else [load_controlnet(path, unet=base.unet).eval()]
        pipe = ControlNetPipeline.from_components(base, nets)
        images = generate(pipe, held.prompts, [held.conditions] * len(nets), args)
        k, spread = kid(images, held.ground_truth, seed=args.seed)
        per_sample[name] = np.array([score(g, c) for g, c in zip(images, held.conditions, strict=True)])
        rows.append(
            {
                "setting": name,
                label: float(per_sample[name].mean()),
                paired: _paired(per_sample[name], per_sample.get(plain_name)) if "reward" in name else "",
                "image error to truth": image_error(images, held.ground_truth),
                kid_label: f"{1000 * k:.2f} ± {1000 * spread:.2f}",
                "s / training step": per_step if per_step is not None else "",
            }
        )
        print(rows[-1], flush=True)
        if nets:
            onestep.append({"net": name, **onestep_scores(pipe, held, score, seed=args.seed)})
            samples.append((name, images))
    k, spread = kid(other_draw, held.ground_truth, seed=args.seed)
    rows.append(
        {
            "setting": "ground truth (ceiling)",
            label: mean_score(score, held.ground_truth, held.conditions),
            "image error to truth": 0.0,
            kid_label: f"{1000 * k:.2f} ± {1000 * spread:.2f} (another draw of the world)",
        }
    )
    notes = (
        f"task {args.task}; {args.samples} world training samples; batch {args.batch}, lr {args.lr}, "
        f"{args.train_steps} steps per run; reward variants {args.variants} (threshold of 1000 : weight); "
        "KID on the world's image statistics (evaluate/distribution.py), ± its spread over subsets"
    )
    command = f"reward.py --task {args.task} --variants {args.variants}" + (
        "" if args.train_steps == TRAIN_STEPS else f" --train-steps {args.train_steps}"
    )
    columns = ["setting", label, paired, "image error to truth", kid_label, "s / training step"]
    # the default length writes reward-TASK; another length reward-TASK-Nsteps, beside it
    claim = f"reward-{args.task}" + ("" if args.train_steps == TRAIN_STEPS else f"-{args.train_steps}steps")
    write_results(claim, args, rows, columns, started, notes=notes, script=command)
    write_results(
        f"{claim}-onestep",
        args,
        onestep,
        ["net", "VAE round trip", *[f"t={t}" for t in ONESTEP_TIMESTEPS]],
        started,
        notes=f"{label} of the decoded one-step prediction x0'(x_t, t) of the held-out truth noised to t (no CFG)",
        script=command,
    )
    shown = [(name, list(images[:FIGURE_SAMPLES])) for name, images in samples]
    save_figure(
        Path(args.out) / f"{claim}.png",
        lambda plt: image_strip(plt, shown, f"{args.task}: shipped net, plain continuation, with the reward"),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
