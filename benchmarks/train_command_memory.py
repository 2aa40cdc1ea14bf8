"""Peak memory of the `controlnet train` command itself vs the benchmarked step and diffusers' logic, SD1.5 size.

Three processes per setting (batch size, gradient checkpointing), each its own peak resident set (the kernel's
high-water mark: os.wait4's ru_maxrss, the VmHWM a user's `time -v` shows):

- command: `controlnet train --model.base base.safetensors --model.tokenizer DIR ...` on an SD1.5-sized random
  single file (controlnet.testing.ldm_files, written once into --cache as benchmarks/loading.py does), 256 px
  fill-task data, 1 + --steps optimizer steps, then its checkpoint and export, as a user runs it. The first run
  builds the latent and text caches (their peak, ~3.5 GB, is far below training's), the later ones reuse them.
- step: benchmarks/training.py's "ours" child (the trainer's step on an in-memory base, from building the
  trainable parts through the last step), same batch, steps and checkpointing, float32.
- diffusers: the same script's "diffusers" child (train_controlnet.py's logic: VAE and text encoder every step,
  its own NCHW copies, torch's AdamW). It needs ~15 GB at batch 1: --with-diffusers only on a machine with room.

    python benchmarks/train_command_memory.py [--settings 1,1c,2,2c] [--steps 1] [--with-diffusers]

"1c" is batch 1 with --model.gradient_checkpointing true. Ratios: command / step (target <= 1.10) and
command / diffusers (target < 1).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

RESOLUTION = 256
THREADS = 2


def peak_of(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """(peak resident GB, wall s, exit status) of `cmd`, its output in `log`."""
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 2**20, time.perf_counter() - started, proc.returncode


def command_peak(files: Path, data: Path, work: Path, batch: int, checkpointing: bool, steps: int) -> float:
    run = work / f"run-{batch}-{checkpointing}"
    cmd = [
        sys.executable,
        "-m",
        "controlnet.cli",
        "train",
        "--model.base",
        str(files / "base.safetensors"),
        "--model.tokenizer",
        str(files / "tokenizer"),
        "--data.path",
        str(data),
        "--data.resolution",
        str(RESOLUTION),
        "--data.cache_dir",
        str(work / "cache"),
        "--train.output_dir",
        str(run),
        "--train.batch_size",
        str(batch),
        "--train.max_steps",
        str(1 + steps),
        "--train.threads",
        str(THREADS),
        "--model.gradient_checkpointing",
        str(checkpointing).lower(),
        "--quiet",
    ]
    peak, wall, rc = peak_of(cmd, work / f"command-{batch}-{checkpointing}.log")
    if rc != 0:
        raise RuntimeError((work / f"command-{batch}-{checkpointing}.log").read_text()[-3000:])
    print(f"  command  batch {batch} checkpointing {checkpointing}: peak {peak:.2f} GB ({wall:.0f} s)", flush=True)
    return peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="1,1c,2,2c", help="batch sizes, 'c' for gradient checkpointing")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps after the first (default 1)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "controlnet-bench-files")
    parser.add_argument("--with-diffusers", action="store_true", help="also diffusers' logic (~15 GB at batch 1)")
    args = parser.parse_args()

    import loading
    import training

    from controlnet.world.dataset import write_dataset

    files = loading.prepare("sd15", args.cache)
    settings = [(int(s.rstrip("c")), s.endswith("c")) for s in args.settings.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-command-memory-") as tmp:
        work = Path(tmp)
        data = write_dataset("fill", 2 * max(b for b, _ in settings) * (1 + args.steps), RESOLUTION, work / "data")
        for batch, checkpointing in settings:
            command = command_peak(files, data, work, batch, checkpointing, args.steps)
            step = training.run_child(
                ["ours"], "sd15", args.steps, THREADS, str(work), "reuse", batch=batch, checkpointing=checkpointing
            )["peak_rss_gb"]
            theirs = None
            if args.with_diffusers:
                theirs = training.run_child(
                    ["diffusers"], "sd15", args.steps, THREADS, str(work), "default", batch=batch,
                    checkpointing=checkpointing,
                )["peak_rss_gb"]  # fmt: skip
            rows.append((batch, checkpointing, command, step, theirs))
    print(f"\nSD1.5 size, {RESOLUTION} px, float32, {THREADS} threads, 1 + {args.steps} steps; peak resident GB:")
    for batch, checkpointing, command, step, theirs in rows:
        line = (
            f"  batch {batch}, checkpointing {'on ' if checkpointing else 'off'}: command {command:.2f}, "
            f"step {step:.2f} -> {command / step:.3f}x (target <= 1.10)"
        )
        if theirs is not None:
            line += f"; diffusers' logic {theirs:.2f} -> {command / theirs:.3f}x (target < 1)"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
