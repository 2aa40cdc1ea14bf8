"""Small pieces of the training loop: per-step random generators, the optimizer and LR schedule, signals, the run log.

Kept apart from trainer.py so the trainer reads as the paper's recipe; nothing here knows about models.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from controlnet.train.config import OptimConfig

logger = logging.getLogger(__name__)


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """The generator of every random draw of one micro-step: a function of (seed, micro_step) only."""
    state = np.random.SeedSequence([seed, micro_step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def build_optimizer(optim: OptimConfig, params) -> torch.optim.Optimizer:
    """The optimizer `optim` asks for over `params` (tensors or param groups): fused AdamW, or bitsandbytes'
    AdamW8bit with optim.use_8bit_adam (CUDA only)."""
    kwargs = dict(betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps, weight_decay=optim.weight_decay)
    if optim.use_8bit_adam:
        if not torch.cuda.is_available():
            raise ValueError("optim.use_8bit_adam needs a CUDA GPU")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("optim.use_8bit_adam needs `pip install bitsandbytes`") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    # the fused kernel (CPU and CUDA) does the whole update in one pass: ~2x faster than the per-op loop
    return torch.optim.AdamW(params, fused=True, **kwargs)


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


class StopOnSignal:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and exits after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        logger.warning("signal %d: saving a checkpoint and stopping after this step", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def any_process(acc, flag: bool) -> bool:
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


def broadcast_history(acc, history: list) -> list:
    if acc.num_processes == 1:
        return history
    from accelerate.utils import broadcast_object_list

    box = [history]
    broadcast_object_list(box, from_process=0)
    return [tuple(h) for h in box[0]]


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after `step` (a resumed run logs them again)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    if step == 0:
        lines = []
    path.write_text("".join(ln + "\n" for ln in lines))


def save_grid(path: Path, rows: list, limit: int) -> None:
    from PIL import Image

    from controlnet.train.validation import grid

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid([list(r)[:limit] for r in rows])).save(path)


def check_trackers(names: tuple[str, ...]) -> None:
    """Every tracker of train.log_with is importable (accelerate alone would only warn and log nothing)."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(name) is None:
            extra = " (or `pip install -e '.[tensorboard]'`)" if name == "tensorboard" else ""
            raise ValueError(f"train.log_with={name!r} needs the {name!r} package: `pip install {name}`{extra}")


def rank_digests(acc, params) -> list[str]:
    """sha256 of `params` on every process (DDP keeps them identical; the trainer checks it)."""
    import hashlib

    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    if acc.num_processes == 1:
        return [h.hexdigest()]
    from accelerate.utils import gather_object

    return list(gather_object([h.hexdigest()]))
