"""Claim (paper Sec. 3.4, Fig. 5/6): with no prompt, CFG resolution weighting helps control.

With an empty prompt the conditional and unconditional branches of classifier-free guidance see the same text, so
plain control (the ControlNet's residuals in both branches) makes CFG a no-op on the control: the image follows
the condition only as far as the net alone pushes it. Guess mode ("ControlNet is more important") gives the
residuals to the conditional branch only, so CFG amplifies them, with the per-block decay 0.825^(12 - i); the
paper's CFG resolution weighting does the same with weights w_i = 64 / h_i (generate/guidance.py).

For each built-in ControlNet (fill, canny, seg, pose) on its held-out world set, the fidelity metric (evaluate/)
of: the base alone with an empty prompt (floor), plain control, guess mode, CFG resolution weighting (all with an
empty prompt), and plain control with the full prompt (what the prompt adds).

    python benchmarks/paper/guidance.py                 # n 50, 20 steps, CFG 4 (the built-in base's default)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    generate,
    image_strip,
    mean_score,
    parse_args,
    pipeline,
    save_figure,
    without_control,
    write_results,
)

from controlnet.evaluate.heldout import heldout_set  # noqa: E402
from controlnet.evaluate.report import TASK_METRICS  # noqa: E402

TASKS = ("fill", "canny", "seg", "pose")
SETTINGS = (  # (column, prompt given, control mode or None for no control)
    ("floor (no control)", False, None),
    ("plain", False, "balanced"),
    ("guess mode", False, "controlnet"),
    ("CFG resolution", False, "cfg_resolution"),
    ("plain + prompt", True, "balanced"),
)


def main() -> int:
    args = parse_args(__doc__, n=50)
    started = time.time()
    rows, shown = [], []
    for task in TASKS:
        pipe = pipeline([task])
        floor = without_control(pipe)
        held = heldout_set(task, args.n, size=64)
        metric = TASK_METRICS[task][0]
        row = {"task": task, "metric": metric.name}
        if task == "seg":
            shown.append(("seg condition", held.conditions[:6]))
        for column, with_prompt, mode in SETTINGS:
            prompts = held.prompts if with_prompt else [""] * len(held)
            if mode is None:
                images = generate(floor, prompts, [], args)
            else:
                images = generate(pipe, prompts, [held.conditions], args, control_mode=mode)
            row[column] = mean_score(metric.fn, images, held.conditions)
            if task == "seg":
                shown.append((column, images[:6]))
        rows.append(row)
        print(f"{task}: " + ", ".join(f"{c} {row[c]:.3f}" for c, _, _ in SETTINGS), flush=True)
    columns = ["task", "metric", *(c for c, _, _ in SETTINGS)]

    def figure(plt, rows):
        fig, bars = plt.subplots(figsize=(8, 3.2))
        width = 0.16
        for k, (column, _, _) in enumerate(SETTINGS):
            bars.bar([i + k * width for i in range(len(rows))], [r[column] for r in rows], width, label=column)
        bars.set_xticks([i + 2 * width for i in range(len(rows))], [f"{r['task']}\n{r['metric']}" for r in rows])
        bars.set_ylabel("fidelity (higher is better)")
        bars.set_title("empty prompt: plain control vs guess mode vs CFG resolution weighting", fontsize=9)
        bars.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        return fig

    write_results("guidance", args, rows, columns, started, figure)
    save_figure(
        Path(args.out) / "guidance-seg.png",
        lambda plt: image_strip(
            plt, shown, "seg, empty prompt: each setting on the same 6 held-out layouts and seeds"
        ),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
