"""`controlnet train CONFIG [--section.field VALUE ...]`, `controlnet demo` and `controlnet export CHECKPOINT --out
FOLDER` (thin: parse, call, print).

The flags are generated from the config dataclasses by settings_cli (their field docstrings are the help), so a
YAML/JSON file and the command line set the same typed fields. Under `accelerate launch` the same command trains
with DDP.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from controlnet.settings_cli import add_arguments, given_values
from controlnet.train.config import SECTIONS, resolve_config
from controlnet.train.demo import DemoConfig, reproduce, run_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a ControlNet from a config file plus flag overrides",
        description="Train a ControlNet on paired data (paper Sec. 3.3): a locked base, a trainable copy of its "
        "encoder, 50% empty prompts. CONFIG is a YAML or JSON file with the sections below; any field can be "
        "overridden as --SECTION.FIELD VALUE. The run folder (train.output_dir) gets config.json, metrics.jsonl, "
        "checkpoints/, final/ and report.html; rerunning the same command resumes from the newest checkpoint. "
        "Multi-GPU: `accelerate launch -m controlnet.cli train CONFIG`.",
    )
    train.add_argument("config", nargs="?", default=None, help="YAML or JSON config file (optional)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    for section, cls in SECTIONS.items():
        # --section.field, spelled as in a config file; a flag not given leaves the file's value (or the default)
        group = train.add_argument_group(f"{section}: {cls.__doc__.splitlines()[0]}")
        add_arguments(
            group,
            cls,
            prefix=f"{section}.",
            dest_prefix=f"override:{section}.",
            suppress_defaults=True,
            show_defaults=True,
            hyphens=False,
            switches=False,
        )
    train.set_defaults(func=run_train)
    add_demo_parser(subparsers)
    add_export_parser(subparsers)


def overrides_from(args: argparse.Namespace) -> dict[str, object]:
    """{"section.field": value} for the flags given (already read as the fields' types)."""
    return {
        f"{section}.{name}": value
        for section, cls in SECTIONS.items()
        for name, value in given_values(args, cls, f"override:{section}.").items()
    }


class ProgressBar:
    """tqdm bar with loss, samples/s, time per step and the time left; fidelity when validation ran (a union net's
    mean and each type's).

    The step bar opens at the first step (not during loading: a 0/N bar would sit there while the base loads) and
    closes at the last one, so that the checkpoint and export after it (phase lines, controlnet/progress.py) do not
    re-render it. Its time per step and time left count only the optimizer steps run in this process (the trainer
    times each one: `StepInfo.step_seconds`), not the steps of a run resumed from, nor validation or checkpoints.
    `loading` shows the base's components as they load, `message` prints one line above the bars.
    """

    # tqdm's own rate and time left would divide by the bar's lifetime (checkpoints and validation included)
    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt}{postfix}"  # tqdm starts the postfix with ", "

    def __init__(self, total: int | None, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self.bar = self.load_bar = None
        self.fidelity, self.fidelity_by_type = None, None
        self.steps, self.step_seconds = 0, 0.0  # optimizer steps run in this process, and their time

    def loading(self, name: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.load_bar is None:
            # on a terminal only (disable=None), erased when done: as generate's (generate/commands.py loading_bar)
            self.load_bar = tqdm(
                total=total,
                desc="loading base",
                unit="part",
                disable=None if self.enabled else True,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
            )
        self.load_bar.set_postfix_str(name, refresh=False)
        self.load_bar.update(done - self.load_bar.n)
        if done >= total:
            self.load_bar.close()

    def message(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)

    def __call__(self, info) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                initial=info.step - 1,  # a resumed run: the steps done before count as done, not as this run's
                unit="step",
                disable=not self.enabled,
                file=sys.stderr,
                dynamic_ncols=True,
                bar_format=self.BAR_FORMAT if self.total else None,
            )
        self.steps += 1
        self.step_seconds += info.step_seconds
        if info.fidelity is not None:
            self.fidelity, self.fidelity_by_type = info.fidelity, info.fidelity_by_type
        per_step = self.step_seconds / self.steps
        postfix = {"loss": f"{info.loss:.4f}", "samples/s": f"{info.samples_per_s:.1f}"}
        if self.total:
            postfix["s/step"] = f"{per_step:.2f}"
            postfix["left"] = _minutes(per_step * (self.total - info.step))
        if self.fidelity is not None:  # a union net's: the mean over its types, then each type's
            by_type = ", ".join(f"{t} {v:.3f}" for t, v in (self.fidelity_by_type or {}).items())
            postfix["fidelity"] = f"{self.fidelity:.3f}" + (f" ({by_type})" if by_type else "")
        if info.skipped:
            postfix["skipped"] = "non-finite"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)
        if self.total and info.step >= self.total:
            self.bar.close()

    def close(self) -> None:
        for bar in (self.load_bar, self.bar):
            if bar is not None:
                bar.close()


def _minutes(seconds: float) -> str:
    """h:mm:ss or m:ss, as tqdm writes times."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def print_summary(summary, started: float) -> None:
    print(
        f"{summary.status} at step {summary.step} in {time.time() - started:.0f} s; run folder {summary.run_dir}"
    )
    if summary.validation:
        last_step, last = summary.validation[-1]
        print(
            f"fidelity at step {last_step}: {last:.3f} (floor {summary.floor:.3f}, ceiling {summary.ceiling:.3f}); "
            f"convergence step: {summary.convergence_step if summary.convergence_step is not None else 'not reached'}"
        )
    if summary.final_dir:
        print(f"trained ControlNet: {summary.final_dir}")
    print(f"report: {summary.run_dir / 'report.html'}")


def run_train(args: argparse.Namespace) -> int:
    from controlnet.train.trainer import NonFiniteLossError, train

    config = resolve_config(args.config, overrides_from(args))
    started = time.time()
    main_process = os.environ.get("RANK", "0") == "0"  # under accelerate/torchrun only rank 0 shows a bar
    bar = ProgressBar(config.train.max_steps, enabled=main_process and not args.quiet)
    try:
        summary = train(config, callback=bar, on_load=bar.loading, on_message=bar.message)
    except NonFiniteLossError as err:
        raise ValueError(str(err)) from None
    finally:
        bar.close()
    if not main_process:
        return 0
    print_summary(summary, started)
    return 130 if summary.status == "interrupted" else 0


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a ControlNet on the built-in world in minutes (no downloads) and write a report",
        description="Make a fill-task dataset from the built-in world, train a ControlNet on the shipped tiny base "
        "(paper Sec. 3.3 recipe), watch it suddenly follow the outlines (Sec. 4), and write report.html with the "
        "final fidelity next to floor (base alone) and ceiling (ground truth).",
    )
    add_arguments(parser, DemoConfig)  # --field-name per field; bools as --flag/--no-flag
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="after training, reload final/controlnet through the pipeline and re-score it",
    )
    parser.set_defaults(func=_run_demo_command)


def _run_demo_command(args: argparse.Namespace) -> int:
    demo = DemoConfig(**given_values(args, DemoConfig))
    started = time.time()
    bar = ProgressBar(None, enabled=not args.quiet)  # time-limited: the number of steps is not known in advance
    try:
        summary = run_demo(demo, bar, on_load=bar.loading)
    finally:
        bar.close()
    print_summary(summary, started)
    if args.verify and summary.final_dir:
        recorded, again = reproduce(summary.run_dir)
        print(f"reloaded through the pipeline: fidelity {again:.4f} (report: {recorded:.4f})")
    return 0


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a training checkpoint (DDP, FSDP2 sharded, DeepSpeed) as full ControlNet weights",
        description="Write the full weights of a training checkpoint RUN/checkpoints/step-N as the trainer's final "
        "export does (a diffusers folder OUT/controlnet and an original-format file OUT/controlnet.safetensors): an "
        "FSDP2 checkpoint's shards (sharded/) or a DeepSpeed one's partitions (deepspeed/, needs deepspeed) are "
        "joined in this one process, no launcher or process group needed; a DDP checkpoint is already full. The "
        "net is rebuilt from the run's config.json and the base's config files (no base weights are read). OUT is "
        "written completely or not at all.",
    )
    parser.add_argument("checkpoint", type=Path, help="a checkpoint folder: RUN/checkpoints/step-N")
    parser.add_argument("--out", type=Path, required=True, help="the export folder to create (must not exist)")
    parser.add_argument(
        "--formats",
        default=None,
        help="comma-separated formats: diffusers, original (default: the run's checkpoint.export_formats)",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="the run's config.json (default: RUN/config.json)"
    )
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from controlnet.train.sharded_export import export_checkpoint

    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else None
    checked = export_checkpoint(args.checkpoint, args.out, formats, args.config)
    print(f"wrote step {checked.step} of the {checked.kind} checkpoint {checked.folder} to {args.out}")
    return 0
