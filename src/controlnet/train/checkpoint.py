"""Crash-safe, self-describing training checkpoints.

A checkpoint is a folder `checkpoints/step-0000100/` holding everything a resumed run needs to continue as if it
had never stopped: the trained weights (`controlnet.safetensors`, `decoder.safetensors` when the UNet decoder is
trained, `ema.safetensors`), the optimizer and LR-scheduler states, and `state.json` (step, data position, RNG
states, the non-finite streak, the validation history). It is written into a hidden temporary folder, every
file is fsync'ed, and the folder is renamed into place: a checkpoint folder either is complete or does not
exist. Old checkpoints are pruned only after the new one is in place (diffusers' script prunes first).
Weights are checked to be finite before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from controlnet.atomic import atomic_path
from controlnet.io.safe_load import write_state_dict

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"
PARTIAL_PREFIX = ".partial-"
STEP_DIGITS = 7


class NonFiniteWeightsError(RuntimeError):
    """Refusing to write a checkpoint whose weights hold NaN or Inf."""


@dataclass
class CheckpointData:
    """What a checkpoint holds (tensors by file, plus JSON-able state)."""

    weights: dict[str, dict[str, torch.Tensor]]  # file stem -> state dict ("controlnet", "decoder", "ema")
    optimizer: dict
    scheduler: dict
    state: dict


def checkpoint_name(step: int) -> str:
    return f"step-{step:0{STEP_DIGITS}d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def remove_partial(run_dir: Path) -> None:
    """Delete temporary folders left by a process killed while writing a checkpoint."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(PARTIAL_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def _check_finite(weights: dict[str, dict[str, torch.Tensor]]) -> None:
    for stem, state in weights.items():
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteWeightsError(f"{stem} has non-finite values in {bad[:5]}; checkpoint not written")


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint without ever leaving a half-deleted folder under a checkpoint name: rename it to a
    temporary name first (atomic), then delete (a kill during the deletion leaves only a `.partial-` folder)."""
    doomed = checkpoint.with_name(f"{PARTIAL_PREFIX}delete-{checkpoint.name}-{os.getpid()}-{time.time_ns()}")
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, data: CheckpointData, keep: int) -> Path:
    """Write checkpoint `step` atomically, then prune to the newest `keep`. Returns its folder."""
    _check_finite(data.weights)
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(step)
    # Written under a PARTIAL_PREFIX name (remove_partial sweeps what a killed run left), every file flushed, then
    # renamed into place. Re-saving the same step (e.g. the final save after a periodic one) replaces the folder:
    # the old one is first renamed aside into the partial folder (atomic), so no half-deleted checkpoint ever
    # stands under a checkpoint name, and deleted after the new one is in place.
    with atomic_path(final, prefix=f"{PARTIAL_PREFIX}{final.name}-", fsync=True) as tmp:
        tmp.mkdir()
        for stem, state in data.weights.items():
            write_state_dict(state, tmp / f"{stem}.safetensors")  # the user's umask, as every weights file
        torch.save(data.optimizer, tmp / "optimizer.pt")
        torch.save(data.scheduler, tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(data.state, indent=1) + "\n")
    for old in list_checkpoints(run_dir)[:-keep]:
        _remove(old)
    logger.info("saved checkpoint %s", final)
    return final


# the subfolder that marks a checkpoint of a sharded run (train/sharding.py SHARDED_DIR, train/deepspeed_engine.py)
SHARDED_KINDS = {"sharded": "fsdp", "deepspeed": "deepspeed"}


def checkpoint_kind(folder: Path) -> str:
    """Which train.distributed wrote checkpoint `folder`: fsdp, deepspeed, or ddp (full weights, also one process)."""
    return next((kind for sub, kind in SHARDED_KINDS.items() if (Path(folder) / sub).is_dir()), "ddp")


def load_checkpoint(folder: Path) -> CheckpointData:
    """Read a checkpoint folder (tensors through safetensors; optimizer state with weights_only=True)."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpoint.resume={str(folder)!r}: not a checkpoint folder (no {STATE_FILE})")
    kind = checkpoint_kind(folder)
    if kind != "ddp":
        raise ValueError(
            f"checkpoint.resume={str(folder)!r}: a checkpoint of a train.distributed={kind} run; resume it with "
            f"--train.distributed {kind}"
        )
    weights = {p.stem: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}
    return CheckpointData(
        weights=weights,
        optimizer=torch.load(folder / "optimizer.pt", weights_only=True),
        scheduler=torch.load(folder / "scheduler.pt", weights_only=True),
        state=json.loads((folder / STATE_FILE).read_text()),
    )


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: "auto" = the newest in run_dir (or None), "none" = None, else a path."""
    if resume == "none" or not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint.resume={resume!r}: no such checkpoint folder")
    return path
