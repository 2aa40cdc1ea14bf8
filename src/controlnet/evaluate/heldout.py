"""Held-out evaluation sets from the built-in world, generating for them with a pipeline, and scoring any
generator on them.

The `controlnet evaluate` command reduces to `evaluate_generator(heldout_set(task, n), generate, generate_floor)`:
generate images for the held-out conditions and prompts, generate floor images from the prompts alone, and report
both beside the ground truth (report.evaluate_images). Training-time validation generates with the same
`generate_images` and scores with `report.score_by_name`, so a trained net is measured the same way in both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from controlnet.evaluate.report import Report, evaluate_images
from controlnet.world.dataset import check_arguments, make_pair, sample_seed

# Dataset seed of evaluation sets. Sample i of a set made with seed s comes from SeedSequence([s, i]), so
# sets made with `controlnet world make`'s default seed 0 do not share this set's streams.
HELDOUT_SEED = 1_000_003


@dataclass(frozen=True)
class HeldOutSet:
    """n evaluation samples of one task: prompts, conditions and the ground-truth images (H, W, 3) uint8."""

    task: str
    prompts: list[str]
    conditions: list[np.ndarray]
    ground_truth: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.prompts)


def heldout_set(task: str, n: int, size: int = 64, seed: int = HELDOUT_SEED) -> HeldOutSet:
    """The first `n` samples of the world dataset (`task`, `size`, `seed`): what `controlnet world make
    --task TASK --n N --size SIZE --seed SEED` would write."""
    check_arguments(task, n, size, workers=1)
    prompts, conditions, truth = [], [], []
    for index in range(n):
        source, target, prompt = make_pair(task, sample_seed(seed, index), size)
        prompts.append(prompt)
        conditions.append(source)
        truth.append(target)
    return HeldOutSet(task, prompts, conditions, truth)


def evaluate_generator(
    heldout: HeldOutSet,
    generate: Callable[[Sequence[str], Sequence[np.ndarray]], Sequence[np.ndarray]],
    generate_floor: Callable[[Sequence[str]], Sequence[np.ndarray]],
) -> Report:
    """Report a controlled generator against its uncontrolled floor and the ground-truth ceiling.

    generate(prompts, conditions) -> images: the ControlNet-controlled model.
    generate_floor(prompts) -> images: the same base model without control (same prompts).
    """
    generated = list(generate(heldout.prompts, heldout.conditions))
    floor = list(generate_floor(heldout.prompts))
    for name, images in (("generate", generated), ("generate_floor", floor)):
        if len(images) != len(heldout):
            raise ValueError(
                f"{name}: returned {len(images)} images for {len(heldout)} prompts; expected one each"
            )
    return evaluate_images(
        heldout.task, generated, heldout.conditions, heldout.ground_truth, floor, heldout.prompts
    )


def generate_images(
    pipeline,
    prompts: Sequence[str],
    conditions: Sequence[np.ndarray],
    steps: int,
    guidance_scale: float,
    seed: int,
    control_scale: float = 1.0,
    control_type: str | None = None,
) -> list[np.ndarray]:
    """(H, W, 3) uint8 images for prompts + conditions with the pipeline's ControlNet, image k from seed + k.

    One batched pipeline call (the pipeline draws image k's noise from its own generator seeded seed + k, so the
    images do not depend on the batch they were generated in). A pipeline without ControlNets ignores
    `conditions` (the floor of the paper's comparison). control_type: a union net's condition type.
    """
    control = [list(conditions)] if pipeline.controlnets else []
    result = pipeline(
        list(prompts),
        control,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        control_scale=control_scale,
        output_type="np",
        **({"control_type": control_type} if control_type is not None else {}),
    )
    return [(image * 255).round().astype(np.uint8) for image in result.array]
