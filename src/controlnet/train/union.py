"""Training a union ControlNet (xinsir's ControlNet-Union / ProMax; model/union_controlnet.py) on data that holds
several condition types per image (data/sources.py `union_source`: a 'sources' mapping per prompt.json line, or
with `data.union_columns` an imagefolder / hf dataset's column per type).

The objective is the paper's (Eq. 5); what a union net adds:

- its types: `model.union_types` names them (UNION_TYPES names, their publishers' ids), or the data does; the net
  knows `PROMAX_TYPES` types (more when an id needs it), so its files have ProMax's shapes;
- type dropout: each sample keeps each of its conditions with probability `train.union_keep_prob`, at least one
  (`draw_subsets`), so every subset of the types works at inference; the draws come from the micro-step's generator
  (train/loop.py `step_generator`), for the whole global micro-batch: resume and N processes stay exact;
- the call: the net's fused multi-condition forward on the kept (condition, type) pairs, scales 1, its type vector
  marking the kept types (`UnionControlledUNet`: rows that kept the same subset share one call).
- validation (`validation.every`): each type alone, on the held-out samples that hold it, scored with its metric
  (auto: the world task's of each type, from a `controlnet world make --task union` folder's world.json); the
  fidelity is the mean over the types, logged beside each type's (train/validation.py `union_metrics`).

`check_union_data` checks the data against the setting from the index alone (no image decoded, no weight loaded);
`check_continued_net` checks `model.controlnet` (continuing a published or earlier union net, e.g. xinsir's ProMax)
against `model.architecture` and the data's types from the file's header alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from controlnet.model.compose import mid_only, unet_residual_kwargs
from controlnet.train.config import TrainConfig

# xinsir's ProMax knows 8 condition types (Union 6); a fresh union net gets ProMax's shapes
PROMAX_TYPES = 8


def union_names(c: TrainConfig, source) -> tuple[str, ...]:
    """The net's condition types in order: model.union_types, else every type the data names (by id, then name)."""
    from controlnet.model.union_controlnet import UNION_TYPES

    if c.model.union_types:
        return c.model.union_types
    found = {name for i in range(len(source)) for name in source.types(i)}
    return tuple(sorted(found, key=lambda name: (UNION_TYPES.get(name, -1), name)))


def type_ids(names: Sequence[str]) -> tuple[list[int], int]:
    """(the publishers' id of each name, the net's number of types: `PROMAX_TYPES` or the highest id + 1)."""
    from controlnet.model.union_controlnet import UNION_TYPES

    ids = [UNION_TYPES[name] for name in names]
    return ids, max(PROMAX_TYPES, max(ids) + 1)


def open_union_source(c: TrainConfig):
    """The run's union data (data/sources.py `union_source`): the 'sources' mapping per prompt.json line, or with
    data.union_columns an imagefolder / hf dataset's column per type."""
    from controlnet.data.sources import union_source

    d = c.data
    return union_source(Path(d.path), d.union_column_map, d.format, d.image_column, d.caption_column)


def check_union_data(c: TrainConfig) -> None:
    """A union run's settings and data index, before any weight loads: one ValueError / FileNotFoundError line
    naming the setting, or the line, type and file at fault; with validation, each type's metric and a held-out
    sample holding each type. data.union_columns: only with model.architecture=union, on imagefolder / hf data."""
    from controlnet.data.sources import ORIGINAL_INDEX, UnionSource
    from controlnet.model.union_controlnet import UNION_TYPES

    spec = f"data.union_columns={','.join(c.data.union_columns)}"
    if c.data.union_columns and c.model.architecture != "union":
        raise ValueError(
            f"{spec}: only for model.architecture=union (got {c.model.architecture}); a single-condition net "
            "reads data.conditioning_column"
        )
    if not c.data.union_columns and c.data.format not in ("auto", "original"):
        raise ValueError(
            f"data.format={c.data.format}: a union net trains on the union layout ({ORIGINAL_INDEX} lines with a "
            "'sources' mapping of condition types to files); expected data.format auto or original, or "
            "data.union_columns (a column per type) on imagefolder / hf data"
        )
    unknown = [name for name in c.model.union_types if name not in UNION_TYPES]
    if unknown:
        raise ValueError(
            f"model.union_types: unknown type {unknown[0]!r}; expected some of {', '.join(UNION_TYPES)}"
        )
    allowed = set(c.model.union_types) if c.model.union_types else set(UNION_TYPES)
    expected = (
        f"model.union_types={','.join(c.model.union_types)}"
        if c.model.union_types
        else "the union types: " + ", ".join(UNION_TYPES)
    )
    for name in c.data.union_column_map:
        if name not in allowed:
            raise ValueError(f"{spec}: condition type {name!r} is not one of {expected}")
    if c.train.reward:
        raise ValueError(
            "train.reward: not supported for model.architecture=union (its detectors read one condition)"
        )
    if "diffusers" not in c.checkpoint.export_formats:
        raise ValueError(
            f"checkpoint.export_formats={','.join(c.checkpoint.export_formats)}: a union net is exported in the "
            "diffusers layout only (xinsir's files are that layout); expected diffusers"
        )
    root = Path(c.data.path)
    source = open_union_source(c)
    if isinstance(source, UnionSource):  # files: each one exists (hf cells are read by `scan`)
        for i, record in enumerate(source.records):
            for name, path in record.conditions.items():
                if name not in allowed:
                    raise ValueError(
                        f"{source.index}: line {i + 1}: condition type {name!r} is not one of {expected}"
                    )
                if not path.is_file():
                    raise FileNotFoundError(
                        f"{source.index}: line {i + 1}: the {name!r} condition file {path} is missing"
                    )
            if not record.target.is_file():
                raise FileNotFoundError(
                    f"{source.index}: line {i + 1}: the target file {record.target} is missing"
                )
    held_by = [set(source.types(i)) for i in range(len(source))]
    held = set().union(*held_by)
    absent = [name for name in c.model.union_types if name not in held]
    if absent:
        raise ValueError(
            f"model.union_types: no sample of data.path={str(root)!r} holds a {absent[0]!r} condition "
            f"(the data names {', '.join(sorted(held))})"
        )
    if c.validation.every and c.validation.metric != "none":  # each type validated alone (train/validation.py)
        from controlnet.train.validation import check_held_types, union_metrics

        names = union_names(c, source)
        union_metrics(c, names)
        n = c.validation.num_samples
        check_held_types(held_by[-n:], names, n)


def check_continued_net(c: TrainConfig) -> None:
    """`model.controlnet` and `model.architecture` agree (a union file needs architecture union and the reverse),
    and a union file knows every type the run trains: one ValueError line from the header alone."""
    if not c.model.controlnet:
        return
    from controlnet.generate.base import controlnet_path
    from controlnet.io.inspect import inspect_path
    from controlnet.model.union_controlnet import describe_types

    spec = c.model.controlnet
    count = inspect_path(controlnet_path(spec)).condition_types
    if c.model.architecture != "union":
        if count is not None:
            raise ValueError(
                f"model.controlnet={spec}: a union ControlNet ({count} condition types); continue it with "
                "model.architecture=union on union data (a 'sources' mapping per line)"
            )
        return
    if count is None:
        raise ValueError(
            f"model.controlnet={spec}: not a union ControlNet (no {'task_embedding'!r}); model.architecture=union "
            "continues a union net (xinsir's Union/ProMax layout) or starts a fresh one without model.controlnet"
        )
    names = union_names(c, open_union_source(c))
    missing = [name for name, ident in zip(names, type_ids(names)[0], strict=True) if ident >= count]
    if missing:
        raise ValueError(
            f"model.controlnet={spec}: the data's type {missing[0]!r} is not one of the net's {count} types "
            f"({describe_types(count)})"
        )


def draw_subsets(
    available: torch.Tensor, keep_prob: float, generator: torch.Generator, lo: int, hi: int
) -> torch.Tensor:
    """Which conditions each row keeps: (n, K) bool from `available` (n, K) bool, rows lo:hi of it returned.

    Each available condition is kept with probability `keep_prob`; a row that kept none keeps one of its available
    ones, chosen uniformly. Drawn for all n rows of the global micro-batch (two draws from `generator`, in order)."""
    n, k = available.shape
    keep = available & (torch.rand((n, k), generator=generator) < keep_prob)  # (n, K)
    # one fallback per row: the floor(u * count)-th of its available conditions
    u = torch.rand(n, generator=generator)
    count = available.sum(dim=1)  # (n,)
    assert bool((count > 0).all()), "every sample holds at least one condition (union_source checks it)"
    pick = (u * count).long().clamp(max=k - 1)  # (n,)
    rank = available.long().cumsum(dim=1) - 1  # (n, K): the rank of each available condition in its row
    fallback = available & (rank == pick[:, None])
    keep = torch.where(keep.any(dim=1, keepdim=True), keep, fallback)
    return keep[lo:hi]


class UnionControlledUNet(nn.Module):
    """eps_theta(z_t, t, c_t, {c_f^k}): a union ControlNet's residuals into the locked UNet (train/union.py).

    forward takes every type's condition (B, K, C, H, W) and which ones each row keeps (B, K); the rows that keep
    the same subset share the net's front end on their kept (condition, type) pairs (scales 1), and the copied
    encoder and the UNet run once on the whole batch (`UnionControlNet.forward_subsets`).
    """

    def __init__(
        self,
        controlnet: nn.Module,
        unet: nn.Module,
        ids: Sequence[int],
        only_mid_control: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        self.controlnet, self.unet, self.ids = controlnet, unet, list(ids)
        self.only_mid_control, self.channels_last = only_mid_control, channels_last

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        cond: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """noisy (B, C, h, w); timesteps (B,); context (B, L, D); cond (B, K, C_cond, H, W) in [0, 1] (K: the net's
        types in `ids` order); keep (B, K) bool, at least one per row (None: all); added_cond as ControlledUNet's."""
        if keep is None:
            keep = torch.ones(cond.shape[:2], dtype=torch.bool)
        groups: dict[tuple[bool, ...], list[int]] = {}
        for row, pattern in enumerate(keep.tolist()):
            groups.setdefault(tuple(pattern), []).append(row)
        subsets = []
        for pattern, rows in sorted(groups.items()):
            index = torch.tensor(rows, device=noisy.device)
            used = [k for k, on in enumerate(pattern) if on]
            picked = cond.index_select(0, index)  # (b, K, C_cond, H, W)
            hints = [self._embed(picked[:, k]) for k in used]  # K_used x (b, C_0, h, w)
            subsets.append((index, hints, [self.ids[k] for k in used]))
        # one pass of the copied encoder and of the UNet for the whole batch (per-subset calls cost ~3x the time
        # on a 2-core CPU for 4 types: up to 15 small calls per step)
        out = self.controlnet.forward_subsets(noisy, timesteps, context, subsets, added_cond_kwargs=added_cond)
        if self.only_mid_control:
            out = mid_only(out)
        return self.unet(
            noisy,
            timesteps,
            encoder_hidden_states=context,
            added_cond_kwargs=added_cond,
            **unet_residual_kwargs(out),
        ).sample  # (B, C, h, w)

    def _embed(self, cond: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            cond = cond.contiguous(memory_format=torch.channels_last)
        return self.controlnet.embed_condition(cond)
