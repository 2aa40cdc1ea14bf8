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
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    WORK,
    generate,
    mean_score,
    parse_args,
    pipeline,
    positive_int,
    validation_curve,
    write_results,
)
from outlines import other_outlines  # noqa: E402

from controlnet.evaluate.fill import fill_iou  # noqa: E402
from controlnet.evaluate.heldout import heldout_set  # noqa: E402
from controlnet.train.demo import DemoConfig  # noqa: E402
from controlnet.train.validation import convergence_step  # noqa: E402

THRESHOLD = 0.8  # the demo's own convergence threshold


def run_tag(extra: tuple[str, ...]) -> str:
    """A name for runs with more demo flags: "--task shapes --minutes 4" -> "task-shapes-minutes-4"."""
    return "-".join(x.strip("-").replace(".", "_") for x in extra)


def demo(seed: int, threads: int, extra: tuple[str, ...] = ()) -> dict:
    """One `controlnet demo` run (reused when finished); `extra`: more demo flags (e.g. --task shapes)."""
    defaults = DemoConfig()  # runs of other demo defaults (the earlier fill task) are kept apart
    name = f"demo-{defaults.task}-{defaults.steps}steps" + (f"-{run_tag(extra)}" if extra else "")
    out = WORK / name / f"seed{seed}-threads{threads}"
    record = out / "wall_s.txt"
    if not record.exists():
        started = time.time()
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"seed{seed}-threads{threads}.log", "w") as log:
            subprocess.run(
                ["controlnet", "demo", "--out", str(out), "--seed", str(seed), "--threads", str(threads), *extra],
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        record.write_text(f"{time.time() - started:.1f}\n")
    curve = validation_curve(out / "run")
    return {"seed": seed, "threads": threads, "out": out, "curve": curve, "wall_s": float(record.read_text())}


def main() -> int:
    def own_flags(p):
        p.add_argument("--seeds", type=positive_int, default=5, help="seeds 0..N-1 (default: 5)")
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
    runs = []
    extra = tuple(args.demo_args.split())
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:  # 1-thread runs side by side
        runs += list(pool.map(lambda s: demo(s, 1, extra), range(args.seeds)))
    runs += [demo(s, 2, extra) for s in range(args.seeds)]  # 2-thread runs alone

    worlds = {task: heldout_set(task, args.n, size=64) for task in ("fill", "shapes")}
    other_prompts, other_conditions = other_outlines(args.n)
    rows = []
    for run in runs:
        pipe = pipeline([run["out"] / "run" / "final" / "controlnet"])
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
        ax.set_title("controlnet demo: validation curves by seed and thread count", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        return fig

    write_results("convergence" + (f"-{run_tag(extra)}" if extra else ""), args, rows, columns, started, figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
