"""Checked, bucketed, deterministic training data: which samples, in which order, with which geometry.

`scan` opens every sample once before training: a missing or corrupt file, or a pair whose two images differ
in size, is reported by path (all of them, not just the first) and training refuses to start unless the user
asked to skip them. Nothing is ever silently dropped or shifted, so targets and conditions stay aligned.

A union dataset (data/sources.py `union_source`: one condition file per type per sample) reads as a pair whose
condition is a mapping {type: image}; every one of a sample's conditions is checked against its target, and
`PixelPairs.load` gives them the same crop and flip.

`BatchPlan` fixes the data order as a pure function of (seed, epoch): the position in the data is one integer
(the micro-batch counter), which is what makes resumed runs equal uninterrupted ones and lets N processes
split one global batch exactly like one process would see it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from controlnet.data.sources import decode_image
from controlnet.data.transforms import Bucket, PairedTransform, make_buckets, nearest_bucket

logger = logging.getLogger(__name__)
MAX_LISTED_PROBLEMS = 20


@dataclass
class ScanResult:
    """What `scan` found: the usable samples, their image sizes and content digests, and the problems."""

    indices: list[int]  # usable sample indices into the source
    sizes: list[tuple[int, int]]  # (width, height) per usable sample
    digests: list[bytes]  # content key per usable sample
    problems: list[str]  # "path: reason" per unusable sample


def scan(source, skip_bad: bool = False) -> ScanResult:
    """Open every sample; raise ValueError listing the bad ones by path unless `skip_bad`."""
    result = ScanResult([], [], [], [])
    for i in range(len(source)):
        try:
            target_bytes, cond_bytes = source.read(i)
            target = decode_image(target_bytes, "target")
            named = (
                cond_bytes if isinstance(cond_bytes, dict) else {"": cond_bytes}
            )  # a union dataset's {type: ...}
            for name, data in named.items():
                what = f"{name} condition" if name else "condition"
                cond = decode_image(data, what)
                if target.size != cond.size:
                    raise ValueError(f"target is {target.size} but {what} is {cond.size}")
            prompt = source.prompt(i)
            if not isinstance(prompt, str):
                raise ValueError(f"prompt is {type(prompt).__name__}, expected a string")
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises OSError / SyntaxError on corrupt files
            result.problems.append(f"{source.where(i)}: {type(err).__name__}: {err}")
            continue
        result.indices.append(i)
        result.sizes.append(target.size)
        result.digests.append(source.content_key(i))
    if result.problems:
        listed = "\n  ".join(result.problems[:MAX_LISTED_PROBLEMS])
        more = len(result.problems) - MAX_LISTED_PROBLEMS
        message = f"{len(result.problems)} of {len(source)} samples are missing or corrupt:\n  {listed}" + (
            f"\n  ... and {more} more" if more > 0 else ""
        )
        if not skip_bad:
            raise ValueError(message + "\n(set data.skip_bad=true to train without them)")
        logger.warning("skipping %s", message)
    if not result.indices:
        raise ValueError("the dataset has no usable samples")
    return result


def assign_buckets(sizes: list[tuple[int, int]], resolution: int, bucketing: bool, multiple: int) -> list[Bucket]:
    """One bucket per sample: the square training size, or the nearest-aspect bucket when bucketing."""
    if not bucketing:
        return [Bucket(resolution, resolution)] * len(sizes)
    buckets = make_buckets(resolution, multiple)
    return [nearest_bucket(w, h, buckets) for w, h in sizes]


class BatchPlan:
    """Micro-batches of `micro_batch` positions (same bucket each), reshuffled every epoch from (seed, epoch).

    Incomplete batches at the end of each bucket are dropped, so every micro-batch is full and every epoch has
    the same number of batches. Rank r of W takes items [r * B, (r + 1) * B) of each micro-batch (B = micro_batch
    / W), which makes W processes see exactly the batches one process would see.
    """

    def __init__(self, buckets: list[Bucket], micro_batch: int, seed: int):
        self.buckets, self.micro_batch, self.seed = buckets, micro_batch, seed
        groups: dict[Bucket, int] = {}
        for bucket in buckets:
            groups[bucket] = groups.get(bucket, 0) + 1
        self.batches_per_epoch = sum(count // micro_batch for count in groups.values())
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(buckets)} training samples cannot fill one batch of {micro_batch} "
                "(batch_size x processes); use a smaller batch or more data"
            )
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch(self, epoch: int) -> list[list[int]]:
        """The micro-batches (lists of positions into the training samples) of `epoch`."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.buckets))
        by_bucket: dict[Bucket, list[int]] = {}
        for position in order:
            by_bucket.setdefault(self.buckets[position], []).append(int(position))
        batches = []
        for bucket in sorted(by_bucket, key=lambda b: (b.width, b.height)):
            members = by_bucket[bucket]
            usable = len(members) // self.micro_batch * self.micro_batch
            batches += [members[k : k + self.micro_batch] for k in range(0, usable, self.micro_batch)]
        batches = [batches[k] for k in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def batch(self, micro_step: int) -> tuple[int, list[int]]:
        """(epoch, positions) of micro-batch number `micro_step` counted from the start of training."""
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        return epoch, self.epoch(epoch)[index]


class PixelPairs(torch.utils.data.Dataset):
    """Uncached samples: decode + paired transform per access; item = (target (3,H,W) [-1,1], cond uint8, i).

    Indexed by (position, epoch) so random crops/flips are a function of (seed, epoch, sample): reproducible and
    identical however the batch is split over processes or workers.
    """

    def __init__(
        self, source, indices: list[int], buckets: list[Bucket], center_crop: bool, random_flip: bool, seed: int
    ):
        self.source, self.indices, self.buckets, self.seed = source, indices, buckets, seed
        self.center_crop, self.random_flip = center_crop, random_flip

    def __len__(self) -> int:
        return len(self.indices)

    def transform(self, position: int) -> PairedTransform:
        bucket = self.buckets[position]
        return PairedTransform(bucket.width, bucket.height, self.center_crop, self.random_flip)

    def load(self, position: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]:
        """(target (3, H, W) in [-1, 1], condition (C, H, W) uint8); a union dataset's condition is {type: (C, H,
        W) uint8}, every one cropped and flipped as the target (the same draws, from a fresh rng each)."""
        target_bytes, cond_bytes = self.source.read(self.indices[position])
        transform, target = self.transform(position), decode_image(target_bytes)
        if not isinstance(cond_bytes, dict):
            rng = np.random.default_rng([self.seed, epoch, position])
            return transform(target, decode_image(cond_bytes), rng)
        conds = {}
        for name, data in cond_bytes.items():
            rng = np.random.default_rng([self.seed, epoch, position])
            pixels, conds[name] = transform(target, decode_image(data), rng)
        return pixels, conds

    def __getitem__(self, key: tuple[int, int]):
        position, epoch = key
        target, cond = self.load(position, epoch)
        return target, cond, position
