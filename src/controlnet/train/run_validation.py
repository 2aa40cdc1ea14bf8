"""Validation inside a training run: the held-out sets, their images made with the trainable net (its EMA weights
when it keeps one, as they are exported), their fidelity, the floor and ceiling, the sample grids and the log lines.

What is measured, and how a union or a sharded net is validated, is train/validation.py's account (paper Sec. 4,
Fig. 4); this module is the part of `Trainer.run` that does it, given the trainer after `build_model`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from controlnet.progress import phase
from controlnet.train import validation as val
from controlnet.train.config import TrainConfig
from controlnet.train.loop import save_grid

SAMPLES_DIR = "samples"


class ValidatedRun(Protocol):
    """What validation reads of a run: `Trainer` after `build_model` (named here, not imported: the trainer imports
    this module)."""

    config: TrainConfig
    data: Any  # batches.TrainingBatches or transformer_step.TransformerBatches: held_out(), union_names
    acc: Any  # accelerate.Accelerator
    base: Any  # generate.base.BaseComponents
    controlnet: torch.nn.Module
    model: torch.nn.Module  # the net with its locked base (sharded: the FSDP2 roots)
    trainable: list[torch.nn.Parameter]
    ema: list[torch.Tensor] | None
    sharded: bool
    flow: bool
    world: int
    rank: int
    run_dir: Path

    def log(self, record: dict) -> None: ...


class RunValidation:
    """The validation of one run: `floor_and_ceiling(step)` once, `record(step, history)` at every validation.

    `sets` are the validation sets and `metrics` their metrics, keyed by a union net's types (one set per type:
    validation.union_held_out), else one set keyed None; `metric` names them for the log.
    """

    def __init__(self, trainer: ValidatedRun):
        self.trainer = trainer
        c, data = trainer.config, trainer.data
        names = getattr(data, "union_names", ())
        if not names:
            self.sets = {None: val.HeldOut(*data.held_out())}
            self.metrics = {None: val.metric_for(c)}
            self.metric = self.metrics[None]
            return
        self.sets = val.union_held_out(data.source, data.val_indices, names, c.data.resolution)
        self.metrics = val.union_metrics(c, names)
        self.metric = "mean over types of " + ", ".join(f"{t} {m}" for t, m in self.metrics.items())

    @property
    def count(self) -> int:
        """Images per validation: every set's held-out samples."""
        return sum(len(held.prompts) for held in self.sets.values())

    def record(self, step: int, history: list) -> tuple[float | None, dict | None]:
        """Validate on the main process: append the fidelity (a union net's: the mean over its types) to `history`,
        log it (and each type's), save the sample grid (a row per type). (fidelity, {type: fidelity} or None).
        Sharded: every process generates its share (`validate`), the main one logs."""
        t = self.trainer
        if not (t.acc.is_main_process or t.sharded):
            return None, None
        with phase(f"validating at step {step} ({self.count} images)"):
            scores, images = self.validate()
        if not t.acc.is_main_process:
            return None, None
        fidelity = float(np.mean(list(scores.values())))
        history.append((step, fidelity))
        by_type = _by_type("fidelity", scores)
        t.log({"step": step, "event": "validation", "fidelity": fidelity, **by_type, "metric": self.metric})
        grid = t.run_dir / SAMPLES_DIR / f"step-{step:07d}.png"
        save_grid(grid, val.pad_rows(list(images.values())), t.config.validation.grid_samples)
        return fidelity, by_type.get("fidelity_by_type")

    def floor_and_ceiling(self, step: int) -> dict | None:
        """Fidelity of the base alone (floor) and of the held-out targets themselves (ceiling), main process; a union
        net's: the means over its types, each type's beside them. Sharded: every process generates, the others get
        None."""
        t = self.trainer
        with phase(f"validation floor: the base alone ({self.count} images)"):
            floors, floor_images = self.validate(with_control=False)
        if not t.acc.is_main_process:  # sharded: the other processes generated their shares
            return None
        ceilings = {
            key: float(np.mean(val.score(self.metrics[key], held.targets, held.conditions)))
            for key, held in self.sets.items()
        }
        values = {
            "floor": float(np.mean(list(floors.values()))),
            "ceiling": float(np.mean(list(ceilings.values()))),
            **_by_type("floor", floors),
            **_by_type("ceiling", ceilings),
            "metric": self.metric,
        }
        t.log({"step": step, "event": "floor_ceiling", **values})
        rows = [
            row for key, held in self.sets.items() for row in (held.conditions, held.targets, floor_images[key])
        ]
        grid = t.run_dir / SAMPLES_DIR / "reference.png"
        save_grid(grid, val.pad_rows(rows), t.config.validation.grid_samples)
        return values

    @torch.no_grad()
    def validate(self, with_control: bool = True) -> tuple[dict, dict]:
        """Generate for every validation set and score each with its metric: ({key: mean fidelity}, {key: images})
        (keys as `sets`'; a union net's images with their type alone, the net's one-pair call).

        Sharded (FSDP2): every rank calls it and generates its share of each set with the sharded net, rank 0 gets the
        whole sets' scores and images, the others ({}, {}) (train/sharded_validation.py)."""
        t = self.trainer
        sets, seeds = self.sets, dict.fromkeys(self.sets, 0)
        if t.sharded:
            from controlnet.train.sharded_validation import rank_share, reshard

            shares = {key: rank_share(held, t.world, t.rank) for key, held in self.sets.items()}
            sets, seeds = {k: s.padded for k, s in shares.items()}, {k: s.start for k, s in shares.items()}
            reshard(t.model)  # the shards hold the weights (swapped for the EMA's below)
        was_training = t.controlnet.training
        t.controlnet.eval()
        try:
            with self._ema_weights(with_control), t.acc.autocast():
                pipe = self._pipeline(with_control)
                if t.sharded:  # FSDP2 gathers weights keeping their version counters: a CPU pack of them
                    pipe.optimize(pack_cpu_weights=False)  # (generate/cpu_packing.py) could be a stale one
                images = {
                    key: self._generate(
                        pipe, held.prompts, held.conditions, with_control, key if with_control else None, seed
                    )
                    for (key, held), seed in zip(sets.items(), seeds.values(), strict=True)
                }
        finally:
            if t.sharded:  # the root group's gathered weights freed: the next call gathers them from the shards
                reshard(t.model)
            t.controlnet.train(was_training)
        if t.sharded:
            from controlnet.train.sharded_validation import gather_scored

            return gather_scored(shares, images, self.metrics)
        scores = {
            key: float(np.mean(val.score(self.metrics[key], images[key], held.conditions)))
            for key, held in self.sets.items()
        }
        return scores, images

    @contextlib.contextmanager
    def _ema_weights(self, with_control: bool) -> Iterator[None]:
        """The net's weights swapped for the EMA's for the block (validated as they are exported), then back."""
        t = self.trainer
        if t.ema is None or not with_control:
            yield
            return
        from controlnet.train.sharded_validation import copy_into  # whole tensors, or each rank's shards

        backup = [p.detach().clone() for p in t.trainable]
        copy_into(t.trainable, t.ema)
        try:
            yield
        finally:
            copy_into(t.trainable, backup)

    def _pipeline(self, with_control: bool):
        from controlnet.generate.pipeline import ControlNetPipeline

        t = self.trainer
        # a transformer base's pipeline runs with a net only: its floor is the net at scale 0 (`_generate`)
        return ControlNetPipeline.from_components(t.base, [t.controlnet] if with_control or t.flow else [])

    def _generate(
        self, pipe, prompts, conds, with_control: bool, control_type: str | None = None, seed: int = 0
    ) -> list:
        """The validation images of `pipe` (`_pipeline`), a union net's with `control_type` alone; on a transformer
        base one call per prompt, with the guidance its family takes (validation.transformer_guidance). Image k is
        drawn from seed `seed` + k (a rank's share of a sharded validation starts at its first sample's)."""
        t = self.trainer
        v = t.config.validation
        if not t.flow:
            return val.generate(
                pipe, prompts, conds, v.steps, v.guidance_scale, seed=seed, control_type=control_type
            )
        guidance = val.transformer_guidance(t.config, dict(t.base.transformer.config), t.base.arch)
        scale = 1.0 if with_control else 0.0
        return val.generate_on_transformer(pipe, prompts, conds, v.steps, guidance, seed=seed, control_scale=scale)


def _by_type(name: str, scores: dict) -> dict:
    """{NAME_by_type: {type: value}} for a union net's log line; {} for a plain net's one set (key None)."""
    return {} if None in scores else {f"{name}_by_type": scores}
