"""Small training configs over the tiny base for the trainer tests."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from train_tiny import TINY_SIZE

from controlnet.train.config import resolve_config

TINY_HINT = "8,16"


def tiny_config(data: Path, out: Path, **overrides):
    values = {
        "data.path": str(data),
        "data.resolution": str(TINY_SIZE),
        "model.hint_channels": TINY_HINT,
        "train.output_dir": str(out),
        "train.max_steps": "4",
        "train.batch_size": "2",
        "train.log_every": "1",
        "optim.lr": "1e-3",
        "checkpoint.every": "0",
    }
    values.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
    return resolve_config(None, values)


def final_weights(run: Path) -> dict:
    return load_file(str(Path(run) / "final" / "controlnet" / "diffusion_pytorch_model.safetensors"))


def checkpoint_weights(folder: Path) -> dict:
    return load_file(str(Path(folder) / "controlnet.safetensors"))
