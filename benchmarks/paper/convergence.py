"""Claim (paper Sec. 3.3, Sec. 4): training converges suddenly: the fidelity jumps from the floor to near the
ceiling within a few validations instead of rising slowly. And the main job: `controlnet demo` must converge on
every seed and thread count within its time cap, and generalise beyond the renderer it was trained on.

For each seed (default 0-4) and thread count (1 and 2), one `controlnet demo --seed S --threads T` (its defaults
otherwise, output outside the repo, a finished run is reused), then:
- the convergence step (train/validation.py: the first validation from which every later one is >= 0.8), the step
  it stopped at, the wall time of the whole command;
- its ControlNet's filled-shape IoU on 50 world held-out outlines of the fill task (upright circles, 1 px) and of
  the shapes task (any shape and rotation, 1-3 px, wobble), and on 50 outlines drawn by other code
  (benchmarks/paper/outlines.py: PIL, other line widths, hand-drawn wobble), 20 sampler steps, CFG 4.
With --parallel 2 the 1-thread runs go two at a time (one core each; their times are then those of a shared
memory bus), the 2-thread runs always alone.

    python benchmarks/paper/convergence.py --parallel 2      # ~50 minutes on 2 cores

On the built-in transformer base (`--base builtin-dit`): `controlnet demo --base builtin-dit` (the demo's
transformer recipe, train/demo.py DIT_DEMO_RECIPE) for seeds 0-2 at 1 thread (--seeds N for more), the same
measurements; results/convergence-dit.* beside the UNet's.

    python benchmarks/paper/convergence.py --base builtin-dit --parallel 2
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DIT,
    WORK,
    add_base_flag,
    generate,
    mean_score,
    parse_args,
    pipeline,
    positive_int,
    result_name,
    validation_curve,
    write_results,
)
from outlines import other_outlines  # noqa: E402

from controlnet.evaluate.fill import fill_iou  # noqa: E402
from controlnet.evaluate.heldout import heldout_set  # noqa: E402
from controlnet.train.demo import DemoConfig, demo_recipe  # noqa: E402
from controlnet.train.validation import convergence_step  # noqa: E402

THRESHOLD = 0.8  # the demo's own convergence threshold
SEEDS = {"builtin": 5, DIT: 3}  # default --seeds per base
THREADS = {"builtin": (1, 2), DIT: (1,)}  # thread counts per base (builtin-dit: 1 thread, the demo's time cap)


def run_tag(extra: tuple[str, ...]) -> str:
    """A name for runs with more demo flags: "--task shapes --minutes 4" -> "task-shapes-minutes-4"."""
    return "-".join(x.strip("-").replace(".", "_") for x in extra)


def demo_folder(base: str = "builtin", extra: tuple[str, ...] = ()) -> str:
    """The work folder of demo runs on `base` with more demo flags `extra`; runs of other demo defaults (the earlier
    fill task) and of another base are kept apart: demo-shapes-1000steps, demo-dit-shapes-1000steps-lr0.003, ...
    (builtin-dit's recipe is still being tuned: a changed DIT_DEMO_RECIPE gets new runs, not the old ones reused)."""
    defaults = DemoConfig()
    if base == "builtin":
        steps = demo_recipe(defaults, "unet")["steps"]
        name = f"demo-{defaults.task}-{steps}steps"
    else:
        recipe = demo_recipe(defaults, "sd3")
        name = f"demo-dit-{defaults.task}-{recipe['steps']}steps-lr{recipe['lr']:g}"
    return name + (f"-{run_tag(extra)}" if extra else "")


def demo(seed: int, threads: int, extra: tuple[str, ...] = (), base: str = "builtin") -> dict:
    """One `controlnet demo` run on `base` (reused when finished); `extra`: more demo flags (e.g. --task shapes)."""
    out = WORK / demo_folder(base, extra) / f"seed{seed}-threads{threads}"
    record = out / "wall_s.txt"
    base_flags = [] if base == "builtin" else ["--base", base]
    if not record.exists():
        started = time.time()
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"seed{seed}-threads{threads}.log", "w") as log:
            subprocess.run(
                [
                    "controlnet",
                    "demo",
                    *base_flags,
                    "--out",
                    str(out),
                    "--seed",
                    str(seed),
                    "--threads",
                    str(threads),
                    *extra,
                ],
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        record.write_text(f"{time.time() - started:.1f}\n")
    curve = validation_curve(out / "run")
    return {"seed": seed, "threads": threads, "out": out, "curve": curve, "wall_s": float(record.read_text())}


def main() -> int:
    def own_flags(p):
        add_base_flag(p)
        p.add_argument(
            "--seeds", type=positive_int, default=None, help="seeds 0..N-1 (default: 5; with --base builtin-dit 3)"
        )
        p.add_argument(
            "--parallel", type=positive_int, default=1, help="1-thread demo runs at a time (default: 1)"
        )
        p.add_argument(
            "--demo-args",
            default="",
            help='more `controlnet demo` flags, e.g. "--task shapes" '
            "(runs kept apart by them; the world held-out set is the task's)",
        )

    args = parse_args(__doc__, n=50, extra=own_flags)
    started = time.time()
    seeds = range(args.seeds or SEEDS[args.base])
    runs = []
    extra = tuple(args.demo_args.split())
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:  # 1-thread runs side by side
        runs += list(pool.map(lambda s: demo(s, 1, extra, args.base), seeds))
    if 2 in THREADS[args.base]:
        runs += [demo(s, 2, extra, args.base) for s in seeds]  # 2-thread runs alone

    worlds = {task: heldout_set(task, args.n, size=64) for task in ("fill", "shapes")}
    other_prompts, other_conditions = other_outlines(args.n)
    rows = []
    for run in runs:
        pipe = pipeline([run["out"] / "run" / "final" / "controlnet"], base=args.base)
        world_iou = {}
        for task, world in worlds.items():
            images = generate(pipe, world.prompts, [world.conditions], args)
            world_iou[f"world {task} IoU"] = mean_score(fill_iou, images, world.conditions)
        other_images = generate(pipe, other_prompts, [other_conditions], args)
        curve = run["curve"]
        rows.append(
            {
                "seed": run["seed"],
                "threads": run["threads"],
                "converged at step": convergence_step(curve, THRESHOLD) or "no",
                "stopped at step": curve[-1][0] if curve else 0,
                "last validation IoU": curve[-1][1] if curve else 0.0,
                **world_iou,
                "other-renderer IoU": mean_score(fill_iou, other_images, other_conditions),
                "demo wall time (min)": round(run["wall_s"] / 60, 2),
            }
        )
        print(rows[-1], flush=True)
    columns = list(rows[0])
    curves = {(r["seed"], r["threads"]): r["curve"] for r in runs}

    def figure(plt, rows):
        fig, ax = plt.subplots(figsize=(7, 3.4))
        for (seed, threads), curve in curves.items():
            ax.plot(
                [s for s, _ in curve],
                [v for _, v in curve],
                ls="-" if threads == 2 else "--",
                marker=".",
                label=f"seed {seed}, {threads} thr.",
            )
        ax.axhline(THRESHOLD, color="grey", lw=0.8)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation filled-shape IoU")
        on = "" if args.base == "builtin" else f" --base {args.base}"
        ax.set_title(f"controlnet demo{on}: validation curves by seed and thread count", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        return fig

    name = result_name("convergence", args.base) + (f"-{run_tag(extra)}" if extra else "")
    script = "" if args.base == "builtin" else "convergence.py"  # the UNet tables' headers as before
    write_results(name, args, rows, columns, started, figure, script=script)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
