"""Shared parts of the paper-claim scripts: the built-in models, seeding, generation, result tables and figures.

Each script in this folder tests one claim of Zhang, Rao & Agrawala (ICCV 2023) on the built-in world and writes
`results/<claim>.md` (a markdown table), `results/<claim>.json` (the same numbers plus the settings, the machine
and the wall time) and `results/<claim>.png` (a matplotlib figure, the `plots` extra). docs/paper-reproduction.md
shows them next to the paper's own numbers.

Base: the claims are tested on the built-in UNet base (`--base builtin`, the default) and those that apply to a
transformer on the built-in SD3-layout base (`--base builtin-dit`: zero_convolutions.py, convergence.py); the
transformer's results go to `results/<claim>-dit.*` beside the UNet's (`result_name`).

Determinism: every random draw comes from the --seed (held-out scenes from the world's seed streams, image k's
noise from seed + k in the pipeline's own generator); on one machine and thread count a rerun gives the same
numbers (tests/benchmarks/test_paper_scripts.py reruns a short setting).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
DOC = Path(__file__).resolve().parents[2] / "docs" / "paper-reproduction.md"
# training runs, datasets and caches: outside the repo, resumable (a rerun continues or reuses a finished run)
WORK = Path(os.environ.get("CONTROLNET_PAPER_WORK", Path.home() / ".cache" / "controlnet" / "paper"))
# builtin:fill's recipe (src/controlnet/builtin/weights/controlnets/fill/MODEL_CARD.md): the claims that train
# change one flag of it
FILL_RECIPE = shlex.split(
    "--data.resolution 64 --model.base builtin --model.hint_channels 4,8,16 --optim.lr 3e-3 "
    "--optim.max_grad_norm 1.0 --optim.ema_decay 0.99 --train.max_steps 1000 --train.batch_size 32 "
    "--train.seed 0 --train.log_every 25 --checkpoint.every 250 --checkpoint.keep 2 --validation.every 250 "
    "--validation.num_samples 16 --validation.steps 10 --validation.guidance_scale 4.0 "
    "--validation.metric auto --validation.early_stop false"
)

# the bases a claim script can test (--base): the built-in UNet base and the built-in transformer base (SD3 layout)
BASES = ("builtin", "builtin-dit")
DIT = "builtin-dit"


def dit_fill_recipe() -> list[str]:
    """FILL_RECIPE on builtin-dit: the demo's transformer recipe (train/demo.py DIT_DEMO_RECIPE's learning rate and
    steps) in place of the UNet's, the condition through the VAE (no hint encoder), the base's joint blocks but the
    last (SD3's rule: 3 of 4)."""
    from controlnet.builtin.config import DitModelConfig
    from controlnet.train.demo import DIT_DEMO_RECIPE

    unet_only = {"--model.base", "--model.hint_channels", "--optim.lr", "--train.max_steps"}
    kept = [
        flag for k, flag in enumerate(FILL_RECIPE) if flag not in unet_only and FILL_RECIPE[k - 1] not in unet_only
    ]
    return [
        "--model.base",
        DIT,
        "--model.transformer_layers",
        str(DitModelConfig().layers - 1),
        "--optim.lr",
        str(DIT_DEMO_RECIPE["lr"]),
        "--train.max_steps",
        str(DIT_DEMO_RECIPE["steps"]),
        *kept,
    ]


def result_name(claim: str, base: str) -> str:
    """results/<claim>.* for the UNet base, results/<claim>-dit.* for builtin-dit (both kept)."""
    return claim if base == "builtin" else f"{claim}-dit"


def add_base_flag(p: argparse.ArgumentParser) -> None:
    """--base builtin | builtin-dit, for the scripts whose claim applies to a transformer too."""
    p.add_argument(
        "--base",
        choices=BASES,
        default="builtin",
        help="the built-in UNet base (default) or the built-in transformer base (SD3 layout, MMDiT); "
        "builtin-dit's results go to results/<claim>-dit.*",
    )


def positive_int(text: str) -> int:
    """argparse type for counts (samples, steps, seeds, workers): an integer >= 1, else one error line naming it."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def parse_args(
    description: str,
    n: int,
    steps: int = 20,
    cfg: float = 4.0,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The scripts' common flags (and a script's own, added by `extra(parser)`); seeds torch, sets threads."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra is not None:
        extra(p)
    p.add_argument("--n", type=positive_int, default=n, help=f"held-out samples per setting (default: {n})")
    p.add_argument("--steps", type=positive_int, default=steps, help=f"sampler steps (default: {steps})")
    p.add_argument("--cfg", type=float, default=cfg, help=f"guidance scale (default: {cfg}, the built-in base's)")
    p.add_argument("--seed", type=int, default=0, help="image k's noise is drawn from seed + k (default: 0)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the table, JSON and figure go")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args


def pipeline(nets: Sequence, base: str = "builtin"):
    """The built-in base (`base`) with the ControlNets `nets`, in that order: built-in names ("seg") or folders."""
    from controlnet.generate.base import check_base, controlnet_path
    from controlnet.generate.pipeline import ControlNetPipeline

    paths = [controlnet_path(net if isinstance(net, Path) else f"{base}:{net}") for net in nets]
    return ControlNetPipeline.from_pretrained(check_base(base), controlnets=paths)


def without_control(pipe):
    """The same base modules with no ControlNet: the floor (the prompt alone)."""
    import copy

    floor = copy.copy(pipe)
    floor.controlnets = []
    return floor


def generate(pipe, prompts: Sequence[str], conditions: Sequence[Sequence[np.ndarray]], args, **options) -> list:
    """(H, W, 3) uint8 images, one per prompt; `conditions` holds one list per ControlNet of `pipe`.

    `options` are GenerationOptions fields (control_scale, control_mode, ... as a value or one per net). On a
    transformer base (its pipeline takes one condition per net, not per prompt) one call per prompt, image k from
    seed + k as in the one batched call (train/validation.py generate_on_transformer, as the trainer validates)."""
    if is_transformer(pipe):
        return [
            _generate_one(pipe, prompt, [c[k] for c in conditions], args, args.seed + k, **options)
            for k, prompt in enumerate(prompts)
        ]
    with torch.inference_mode():
        result = pipe(
            list(prompts),
            [list(c) for c in conditions],
            steps=args.steps,
            guidance_scale=args.cfg,
            seed=args.seed,
            output_type="np",
            **options,
        )
    return [(image * 255).round().astype(np.uint8) for image in result.array]


def is_transformer(pipe) -> bool:
    return getattr(getattr(pipe, "base", None), "arch", "unet") != "unet"


def _generate_one(pipe, prompt: str, conditions: list[np.ndarray], args, seed: int, **options) -> np.ndarray:
    """One image of a transformer pipeline: `prompt` with one condition per net, at the conditions' size."""
    with torch.inference_mode():
        result = pipe(
            [prompt],
            conditions,
            steps=args.steps,
            guidance_scale=args.cfg,
            seed=seed,
            width=conditions[0].shape[1],
            height=conditions[0].shape[0],
            output_type="np",
            **options,
        )
    return (result.array[0] * 255).round().astype(np.uint8)


def mean_score(metric: Callable, images: Sequence[np.ndarray], conditions: Sequence[np.ndarray], prompts=None):
    if prompts is None:
        return float(np.mean([metric(g, c) for g, c in zip(images, conditions, strict=True)]))
    return float(np.mean([metric(g, c, p) for g, c, p in zip(images, conditions, prompts, strict=True)]))


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
    }


def write_results(
    name: str,
    args,
    rows: list[dict],
    columns: list[str],
    started: float,
    figure: Callable | None = None,
    notes: str = "",
    script: str = "",
) -> None:
    """results/<name>.md, .json and (with matplotlib) .png; prints the table. `script`: the command that made them
    when it is not benchmarks/paper/<name>.py (a --base other than builtin is named in it and in the settings)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"n": args.n, "steps": args.steps, "cfg": args.cfg, "seed": args.seed, "threads": args.threads}
    base = getattr(args, "base", "builtin")
    if base != "builtin":
        settings["base"] = base
    command = f"python benchmarks/paper/{script or name + '.py'}" + (
        "" if base == "builtin" else f" --base {base}"
    )
    table = markdown_table(rows, columns)
    header = f"`{command}` ({', '.join(f'{k} {v}' for k, v in settings.items())})\n\n"
    (out / f"{name}.md").write_text(header + table + (f"\n{notes}\n" if notes else ""))
    record = {
        "claim": name,
        "settings": settings,
        "rows": rows,
        "machine": machine(),
        "wall_s": round(time.time() - started, 1),
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table)
    if out.resolve() == RESULTS:
        update_doc(name, header + table)
    if figure is not None:
        save_figure(out / f"{name}.png", lambda plt: figure(plt, rows))


def save_figure(path: Path, draw: Callable) -> None:
    """`draw(plt)` -> a matplotlib figure, saved as PNG at `path`; one line instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{path.name}: no figure (matplotlib missing: pip install -e '.[plots]')", file=sys.stderr)
        return
    fig = draw(plt)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def curves_figure(plt, curves: dict, title: str):
    """A figure of validation curves: each (label, [(step, fidelity), ...]) one line."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, curve in curves.items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation filled-shape IoU")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return fig


def image_strip(plt, title_rows: list[tuple[str, list[np.ndarray]]], title: str):
    """A figure of image rows: each (label, images) is one row (samples side by side)."""
    cols = max(len(images) for _, images in title_rows)
    fig, axes = plt.subplots(len(title_rows), cols, figsize=(1.3 * cols, 1.4 * len(title_rows)), squeeze=False)
    for r, (label, images) in enumerate(title_rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c])
        axes[r][0].set_title(label, fontsize=7, loc="left")
    fig.suptitle(title, fontsize=9)
    return fig


_MAKING_DATA = threading.Lock()  # the scripts' training threads ask for the same dataset at once


def world_data(task: str = "fill", n: int = 4000) -> Path:
    """A world dataset (`n` samples of `task`, 64 px, seed 0), made once; fill with 4000 is builtin:fill's."""
    data = WORK / "data" / (task if (task, n) == ("fill", 4000) else f"{task}-{n}")
    with _MAKING_DATA:
        _make_world_data(task, n, data)
    return data


def _make_world_data(task: str, n: int, data: Path) -> None:
    if not (data / "prompt.json").exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "controlnet",
                "world",
                "make",
                "--task",
                task,
                "--n",
                str(n),
                "--size",
                "64",
                "--out",
                str(data),
                "--seed",
                "0",
            ],
            check=True,
        )


def train_fill(
    name: str, flags: Sequence[str], threads: int, data: Path | None = None, base: str = "builtin"
) -> Path:
    """Train (or resume, or reuse) a fill ControlNet by FILL_RECIPE (on builtin-dit `dit_fill_recipe()`) + `flags`
    on `data` (default: builtin:fill's 4000 samples); returns its run folder (the net is run/final/controlnet, the
    curve run/metrics.jsonl)."""
    run = WORK / "runs" / name
    if (run / "final" / "controlnet").exists():
        return run
    data = data or world_data()
    run.parent.mkdir(parents=True, exist_ok=True)
    # latents and text embeddings are cached per dataset, and per base: the transformer base's own folder
    cache = WORK / "cache" / (data.name if base == "builtin" else f"{base}-{data.name}")
    recipe = FILL_RECIPE if base == "builtin" else dit_fill_recipe()
    subprocess.run(
        [
            "controlnet",
            "train",
            "--data.path",
            str(data),
            "--data.cache_dir",
            str(cache),
            "--train.output_dir",
            str(run),
            "--train.threads",
            str(threads),
            *recipe,
            *flags,
        ],
        check=True,
    )
    return run


def validation_curve(run: Path) -> list[tuple[int, float]]:
    """(step, validation fidelity) pairs from a run's metrics.jsonl."""
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(int(r["step"]), float(r["fidelity"])) for r in records if r.get("event") == "validation"]


def update_doc(name: str, text: str) -> None:
    """Replace the block between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in DOC with `text`, so the
    document's tables are the ones the scripts last wrote (nothing happens when the markers are absent)."""
    if not DOC.exists():
        return
    doc = DOC.read_text()
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    if start not in doc or end not in doc:
        return
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    DOC.write_text(f"{head}{start}\n{text}{end}{tail}")
