"""Beyond the paper: one union ControlNet (xinsir's Union/ProMax architecture, model/union_controlnet.py) trained on
several world conditions at once, against the built-in single-condition ControlNets.

1. Data: `controlnet world make --task union --types canny,seg,pose,depth --n 4000` (64 px, seed 0): each sample is
   one scene with its canny, seg and depth maps, and its pose map when the scene shows a person (41% of them).
2. Training: the built-in single nets' recipe (their model cards: lr 3e-3, batch 32, EMA 0.99, hint channels
   4,8,16, seed 0) with `--model.architecture union` and type dropout (each condition kept with p 0.5, at least
   one), for `--union-steps` steps: the sum of builtin:canny's, builtin:seg's and builtin:pose's steps (2500 + 1500
   + 1500), so the union net gets the singles' total budget and learns depth in it as well.
3. Fidelity per condition on the held-out sets of `controlnet evaluate` (50 samples, 20 DPM-Solver++ steps, CFG 3,
   the same metrics, floor and ceiling): the single net (where one ships), the union net with that type, and the
   union net one image per call (its fusion transformer attends over the batch axis, as diffusers' and xinsir's
   do, so a batched call is not row-for-row the same: measured, not assumed).
4. Two conditions at once (paper Sec. 3.4's composition, `composition.py`'s scenes: the seg map with the person
   removed + the pose map): builtin:seg + builtin:pose composed vs the union net with both (one fused call).
5. Parameters, and training time per step of the union and a single net measured in this run (same recipe,
   threads and data size; `--time-steps` steps each after the latent cache is built).

    python benchmarks/paper/union.py                      # trains the union net first: ~1 h on 2 cores
    python benchmarks/paper/union.py --union-steps 4 --n 2 --steps 2 --time-steps 2 --samples 64 --out /tmp/u
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    FILL_RECIPE,
    WORK,
    generate,
    mean_score,
    parse_args,
    pipeline,
    positive_int,
    save_figure,
    without_control,
    write_results,
)

from controlnet.evaluate.heldout import HELDOUT_SEED, heldout_set  # noqa: E402
from controlnet.evaluate.report import TASK_METRICS  # noqa: E402
from controlnet.world.dataset import UNION_TYPE_NAMES, sample_seed  # noqa: E402
from controlnet.world.scene import sample_scene  # noqa: E402
from controlnet.world.scene_sample import render_scene  # noqa: E402

TYPES = ("canny", "seg", "pose", "depth")
SINGLES = ("canny", "seg", "pose")  # the shipped single nets among TYPES (builtin:NAME)
SINGLE_STEPS = {"canny": 2500, "seg": 1500, "pose": 1500}  # their model cards' training steps
SAMPLES = 4000
COMPOSITION_SEED = HELDOUT_SEED + 5  # composition.py's held-out scenes
WITHIN = 0.10  # ship builtin:union if it is within 10% of each single net (issue 31)


def recipe() -> list[str]:
    """FILL_RECIPE's flags (the built-in single nets' recipe) minus validation and max_steps."""
    out, skip = [], False
    for flag in FILL_RECIPE:
        if skip:
            skip = False
            continue
        if flag.startswith("--validation.") or flag == "--train.max_steps":
            skip = True
            continue
        out.append(flag)
    return out


def union_data(types: tuple[str, ...], n: int) -> Path:
    """The union world dataset (made once, outside the repo)."""
    data = WORK / "data" / f"union-{'-'.join(types)}-{n}"
    if not (data / "prompt.json").exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["controlnet", "world", "make", "--task", "union", "--types", ",".join(types), "--n", str(n)]
            + ["--size", "64", "--out", str(data), "--seed", "0"],
            check=True,
        )
    return data


def train(data: Path, run: Path, steps: int, threads: int, union: bool) -> Path:
    """Train (or resume, or reuse) a net by the singles' recipe on `data` for `steps`; returns the run folder."""
    if (run / "final" / "controlnet").exists():
        return run
    run.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["controlnet", "train", "--data.path", str(data), "--data.cache_dir", str(WORK / "cache" / data.name)]
        + ["--train.output_dir", str(run), "--train.threads", str(threads), "--train.max_steps", str(steps)]
        + recipe()
        + ["--validation.every", "0"]
        + (["--model.architecture", "union"] if union else []),
        check=True,
    )
    return run


def seconds_per_step(run: Path) -> float:
    """Steady-state s/step from a run's metrics.jsonl: between its first and last logged step."""
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in records if "elapsed_s" in r and "loss" in r]
    first, last = steps[0], steps[-1]
    return (last["elapsed_s"] - first["elapsed_s"]) / max(last["step"] - first["step"], 1)


def timed_runs(union_set: Path, types: tuple[str, ...], steps: int, threads: int) -> dict[str, float]:
    """s/step of the union net on `union_set` and of a single canny net on a canny set of the same size, each
    `steps` logged steps (the latent cache is built before the first)."""
    n = len((union_set / "prompt.json").read_text().splitlines())
    with tempfile.TemporaryDirectory() as tmp:
        single_set = Path(tmp) / "canny"
        subprocess.run(
            ["controlnet", "world", "make", "--task", "canny", "--n", str(n), "--size", "64"]
            + ["--out", str(single_set), "--seed", "0"],
            check=True,
            capture_output=True,
        )
        out = {}
        for name, data, union in (("union", union_set, True), ("single (canny)", single_set, False)):
            run = Path(tmp) / f"run-{'union' if union else 'single'}"
            subprocess.run(
                ["controlnet", "train", "--data.path", str(data), "--data.cache_dir", str(Path(tmp) / "cache")]
                + ["--train.output_dir", str(run), "--train.threads", str(threads)]
                + [
                    "--train.max_steps",
                    str(steps + 1),
                    *recipe(),
                    "--validation.every",
                    "0",
                    "--train.log_every",
                    "1",
                ]
                + (["--model.architecture", "union"] if union else []),
                check=True,
                capture_output=True,
            )
            out[name] = seconds_per_step(run)
    return out


def parameters(pipe) -> list[int]:
    return [sum(p.numel() for p in net.parameters()) for net in pipe.controlnets]


def fidelity_rows(union_net: Path, types: tuple[str, ...], args) -> tuple[list[dict], dict]:
    """Per condition: floor, single net, union net (batched and one image per call), ceiling; the first metric."""
    rows, shown = [], {}
    union_pipe = pipeline([union_net])
    floor_pipe = without_control(union_pipe)
    for task in types:
        held = heldout_set(task, args.n)
        metric = TASK_METRICS[task][0]
        prompts, conditions = held.prompts, held.conditions
        union_type = UNION_TYPE_NAMES.get(task, task)
        images = {
            "floor": generate(floor_pipe, prompts, [], args),
            "union": generate(union_pipe, prompts, [conditions], args, control_type=union_type),
        }
        # one image per call (CFG's two rows only), image k from seed + k as in the batched call
        images["union, one image per call"] = [
            generate(union_pipe, [p], [[c]], _seeded(args, args.seed + k), control_type=union_type)[0]
            for k, (p, c) in enumerate(zip(prompts, conditions, strict=True))
        ]
        if task in SINGLES:
            images["single"] = generate(pipeline([task]), prompts, [conditions], args)
        score = {name: mean_score(metric.fn, imgs, conditions) for name, imgs in images.items()}
        ceiling = mean_score(metric.fn, held.ground_truth, conditions)
        single = score.get("single")
        row = {
            "condition": task,
            "metric": metric.name,
            "floor": score["floor"],
            "single net": single if single is not None else "none ships",
            "union net": score["union"],
            "union, one image per call": score["union, one image per call"],
            "ceiling": ceiling,
            "union / single": score["union"] / single if single else "",
        }
        rows.append(row)
        shown[task] = (conditions[:6], images.get("single", [])[:6], images["union"][:6])
        print(
            ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True
        )
    return rows, shown


def _seeded(args, seed: int):
    """`args` with another seed."""
    other = copy.copy(args)
    other.seed = seed
    return other


def composition_rows(union_net: Path, args) -> list[dict]:
    """composition.py's scenes: seg (person removed) + pose, by two single nets composed and by the union net."""
    samples, seg_without_person = [], []
    for i in range(args.n):
        seed = sample_seed(COMPOSITION_SEED, i)
        scene = sample_scene(seed, 64, require_person=True)
        samples.append(render_scene(scene, seed, ("seg", "pose")))
        others = dataclasses.replace(scene, objects=tuple(o for o in scene.objects if o.kind != "person"))
        seg_without_person.append(render_scene(others, seed, ("seg",)).conditions["seg"])
    prompts = [s.prompt for s in samples]
    seg = [s.conditions["seg"] for s in samples]
    pose = [s.conditions["pose"] for s in samples]
    seg_metric, pose_metric = TASK_METRICS["seg"][0], TASK_METRICS["pose"][0]
    singles = pipeline(["seg", "pose"])
    union_twice = pipeline([union_net, union_net])  # one net, loaded once, two units: one fused call per step
    settings = {
        "base alone": (without_control(singles), [], {}),
        "builtin:seg + builtin:pose (composed)": (singles, [seg_without_person, pose], {}),
        "union net, seg + pose (one fused call)": (
            union_twice,
            [seg_without_person, pose],
            {"control_type": ["segment", "openpose"]},
        ),
    }
    rows = []
    for name, (pipe, conditions, options) in settings.items():
        images = generate(pipe, prompts, conditions, args, **options)
        rows.append(
            {
                "setting": name,
                f"seg {seg_metric.name} (whole scene)": mean_score(seg_metric.fn, images, seg),
                f"pose {pose_metric.name}": mean_score(pose_metric.fn, images, pose),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    def own_flags(p):
        p.add_argument("--types", default=",".join(TYPES), help=f"union types (default: {','.join(TYPES)})")
        p.add_argument(
            "--union-steps",
            type=positive_int,
            default=sum(SINGLE_STEPS.values()),
            help="the union net's training steps (default: the single nets' total, 5500)",
        )
        p.add_argument("--samples", type=positive_int, default=SAMPLES, help="union training samples (4000)")
        p.add_argument("--time-steps", type=positive_int, default=20, help="steps of each timed run (20)")

    args = parse_args(__doc__, n=50, cfg=3.0, extra=own_flags)
    started = time.time()
    types = tuple(t.strip() for t in args.types.split(",") if t.strip())
    data = union_data(types, args.samples)
    run = train(data, WORK / "runs" / f"{data.name}-{args.union_steps}steps", args.union_steps, args.threads, True)
    union_net = run / "final" / "controlnet"
    rows, shown = fidelity_rows(union_net, types, args)
    composed = composition_rows(union_net, args)
    timing = timed_runs(data, types, args.time_steps, args.threads)
    union_params = parameters(pipeline([union_net]))[0]
    single_params = parameters(pipeline(["canny"]))[0]
    ships = all(isinstance(r["union / single"], str) or r["union / single"] >= 1 - WITHIN for r in rows)
    notes = (
        f"\nParameters: union net {union_params / 1e6:.2f}M, one single net {single_params / 1e6:.2f}M "
        f"({len(SINGLES)} singles: {len(SINGLES) * single_params / 1e6:.2f}M). "
        f"Training: {args.union_steps} union steps vs {sum(SINGLE_STEPS.values())} single steps in all; s/step "
        f"measured here ({args.time_steps} steps each, {args.threads} threads): "
        + ", ".join(f"{k} {v:.2f}" for k, v in timing.items())
        + f". Within {WITHIN:.0%} of every shipped single net: {'yes' if ships else 'no'}.\n\n"
        "Two conditions at once (composition.py's scenes, seg without the person + pose):\n\n"
    )
    from common import markdown_table

    comp_columns = list(composed[0])
    notes += markdown_table(composed, comp_columns) + "\n"
    columns = list(rows[0])

    def figure(plt, rows):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        names = ["floor", "single net", "union net", "ceiling"]
        width = 0.2
        for j, name in enumerate(names):
            values = [r[name] if isinstance(r[name], float) else np.nan for r in rows]
            ax.bar(np.arange(len(rows)) + (j - 1.5) * width, values, width, label=name)
        ax.set_xticks(np.arange(len(rows)), [f"{r['condition']}\n({r['metric']})" for r in rows], fontsize=8)
        ax.set_ylabel("fidelity")
        ax.set_title(
            "one union ControlNet vs one net per condition (built-in world, 50 held-out each)", fontsize=9
        )
        ax.legend(fontsize=7)
        return fig

    write_results("union", args, rows, columns, started, figure, notes=notes)
    (Path(args.out) / "union.json").write_text(
        json.dumps(
            {
                **json.loads((Path(args.out) / "union.json").read_text()),
                "composition": composed,
                "seconds_per_step": timing,
                "parameters": {"union": union_params, "single": single_params},
                "union_steps": args.union_steps,
                "types": list(types),
                "ships": ships,
            },
            indent=2,
        )
        + "\n"
    )
    save_figure(Path(args.out) / "union-samples.png", lambda plt: _samples_figure(plt, shown))
    return 0


def _samples_figure(plt, shown: dict):
    from common import image_strip

    rows = []
    for task, (conditions, single, union) in shown.items():
        rows.append((f"{task} condition", list(conditions)))
        if len(single):
            rows.append((f"builtin:{task}", list(single)))
        rows.append((f"union net, {task}", list(union)))
    return image_strip(plt, rows, "held-out conditions, the single nets and the union net (6 each)")


if __name__ == "__main__":
    raise SystemExit(main())
