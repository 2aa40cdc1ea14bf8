"""Validation and EMA of a sharded (FSDP2, train/sharding.py) ControlNet, without gathering the whole net on one rank.

Validation: a sharded net computes only with every rank taking part (each of its layers all-gathers its shards for the
call and frees them after), so every rank generates, each its share of the held-out samples: rank r takes the
contiguous slice r of each validation set (`rank_share`), padded with copies of sample 0 to the length every rank
gets, so that all ranks call the net the same number of times (a transformer base's pipeline makes one call per
image); the padding's images are dropped. Image k is drawn from seed k wherever it is generated (the pipeline seeds
each image's noise by itself: evaluate/heldout.py), so the slices' images are the images of one process's whole-set
call, up to float rounding of another batch size. Each rank scores its own images (per-image metrics); rank 0
gathers the images and scores (`gather_scored`: uint8 images, no weights) and writes metrics.jsonl and the sample
grids as a DDP run does.

Memory: no rank ever holds the whole trainable net. Besides its shards a rank holds, during each call, the full
weights of the one FSDP group being run (one hint encoder, down block or the middle block; FSDP2 frees them after),
plus the root group's (conv_in, the embeddings, the zero convolutions), kept from the first call to the end of the
validation (FSDP2 keeps the root unsharded between forwards) and freed then (`reshard`). Validation also costs 1/N of
the sampling work of a rank-0 validation, where N is the number of ranks.

EMA: the average is one tensor per trainable parameter made by `p.detach().clone()`, so for a sharded net a DTensor
sharded like it: each rank holds, updates (`lerp_`, elementwise on its shard) and checkpoints (`ema_state`, written
beside the weights by torch.distributed.checkpoint) only its shard. Validation and the export swap it into the
parameters' shards (`copy_into`); the export then gathers it like the weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from controlnet.train.validation import HeldOut, score

EMA_KEY = "ema"  # the EMA's entries in a sharded checkpoint: ema.0, ema.1, ... (the parameters' order)


class RankShare(NamedTuple):
    """This rank's share of one validation set: the samples `start`, ..., `start + count - 1`, padded (`padded`)
    with copies of sample 0 to the length every rank generates."""

    start: int
    count: int
    padded: HeldOut


def rank_share(held: HeldOut, world: int, rank: int) -> RankShare:
    """Rank `rank`'s contiguous slice of `held` (ceil(n / world) samples, fewer on the last ranks), padded."""
    n = len(held.prompts)
    per = -(-n // world)
    start = min(rank * per, n)
    stop = min(start + per, n)
    indices = [*range(start, stop), *[0] * (per - (stop - start))]
    padded = HeldOut(*([part[i] for i in indices] for part in held))
    return RankShare(start, stop - start, padded)


def gather_scored(
    shares: Mapping, images: Mapping, metrics: Mapping
) -> tuple[dict[object, float], dict[object, list[np.ndarray]]]:
    """Every rank: score this rank's images of each set (`images` as `shares`' keys, padding included) with the set's
    metric; rank 0 gets ({key: mean fidelity of the whole set}, {key: its images in order}), the others ({}, {})."""
    import torch.distributed as dist

    own = {}
    for key, share in shares.items():
        kept = images[key][: share.count]
        own[key] = (kept, score(metrics[key], kept, share.padded.conditions[: share.count]))
    rank = dist.get_rank()
    box = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(own, box, dst=0)
    if rank != 0:
        return {}, {}
    scores = {key: float(np.mean([s for part in box for s in part[key][1]])) for key in shares}
    return scores, {key: [im for part in box for im in part[key][0]] for key in shares}


def reshard(net: nn.Module) -> None:
    """Free every FSDP group's unsharded weights in `net` (the root group's stay gathered after a forward with no
    backward), so that the next call gathers them again from the shards.

    First each outermost FSDP module of `net` is initialised as an FSDP root (a no-op once it has run a forward): FSDP2
    makes a root of the first group that runs, and the pipeline runs the hint encoder's group first
    (`ControlNet.embed_condition`), which would fail the net's own call after it where no training step ran before
    in this process (a validation right after a resume). torch has no public call for it."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in net.modules() if isinstance(m, FSDPModule)]
    for module in modules:  # outer modules first (`modules()` is pre-order): their groups below become non-roots
        module._get_fsdp_state()._lazy_init()
    for module in modules:
        module.reshard()


@torch.no_grad()
def copy_into(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """params[k] <- values[k], each rank on its own shards (DTensors of the same sharding) or the whole tensors."""
    from torch.distributed.tensor import DTensor

    for p, v in zip(params, values, strict=True):
        if isinstance(p, DTensor):
            p.to_local().copy_(v.to_local())
        else:
            p.copy_(v)


def ema_state(ema: Sequence[torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The EMA as torch.distributed.checkpoint entries ({EMA_KEY: {"0": shard, ...}}): saved and loaded in place."""
    return {EMA_KEY: {str(k): e for k, e in enumerate(ema)}}


def saved_ema(folder: Path) -> bool:
    """Whether the sharded checkpoint `folder` (its torch.distributed.checkpoint folder) holds an EMA."""
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return any(k.startswith(f"{EMA_KEY}.") for k in keys)
