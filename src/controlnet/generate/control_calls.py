"""One ControlNet call per denoising step: a unit's net, or the fused units of one union net (generate/pipeline.py).

The pipeline turns its units into `NetCall`s once per generation (hints embedded, scales resolved) and calls each
inside its control window every step. A union net (model/union_controlnet.py) needs each unit's condition type
(`union_type_of`); units that share one union net with the same window and mode run as one multi-condition call
(`fused_units`: xinsir's mode, as diffusers' `StableDiffusionXLControlNetUnionPipeline` runs one
`ControlNetUnionModel` with several images), any other union unit as diffusers' single-condition call.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from controlnet.model.controlnet import ControlNet, ControlNetOutput, scaled
from controlnet.model.union_controlnet import UNION_TYPES, UnionControlNet, describe_types, type_id

REPAINT = "repaint"  # the union type of an inpainting unit (xinsir's ProMax: id 7, the image with masked pixels 0)


@dataclass
class FusedCall:
    """Several units of one union net run as ONE multi-condition call (xinsir's; diffusers' union pipeline with one
    `ControlNetUnionModel` and several images): each condition's features and token carry its unit's scale."""

    units: list[int]  # the units' indices, in their order
    hints: list[torch.Tensor]  # one (B or 2B, C_0, h, w) per unit: E(c) computed once
    types: list[int]  # one type id per unit (distinct)
    scales: list[float]  # one per unit: its strength (the per-condition scales)


@dataclass
class NetCall:
    """One ControlNet call per denoising step (internal): one unit, or the fused units of one union net."""

    net: ControlNet
    hint: torch.Tensor | None  # (B or 2B, C_0, h, w): E(c) computed once (None: fused, the hints are there)
    scales: list[float]  # per output: strength x mode profile x block scales (fused: the mode profile only)
    start: float
    end: float
    conditional_only: bool
    union_type: int | None = None  # a union net's condition type id (model/union_controlnet.py)
    fused: FusedCall | None = None

    def __call__(self, sample, t, context, added_cond_kwargs) -> ControlNetOutput:
        if self.fused is not None:  # the scales go to the conditions, the outputs get the mode's profile only
            f = self.fused
            out = self.net(
                sample,
                t,
                context,
                hints=f.hints,
                types=f.types,
                conditioning_scale=f.scales,
                added_cond_kwargs=added_cond_kwargs,
            )
            return ControlNetOutput(
                [scaled(d, s) for d, s in zip(out.down, self.scales[:-1], strict=True)],
                scaled(out.mid, self.scales[-1]),
            )
        kwargs = dict(hint=self.hint, conditioning_scale=self.scales, added_cond_kwargs=added_cond_kwargs)
        if self.union_type is None:
            return self.net(sample, t, context, **kwargs)
        return self.net.forward_unit(sample, t, context, control_type=self.union_type, **kwargs)


def union_type_of(net: ControlNet, control_type: str | None, k: int, inpaint: bool = False) -> int | None:
    """Net k's condition type id: a union net must have one (by name or id), any other net none.

    `inpaint`: the unit's condition is built from the init image and mask (control "inpaint"); on a union net that
    is the repaint type (xinsir's ProMax, id 7), which such a unit takes when it names none and must not contradict.
    """
    if not isinstance(net, UnionControlNet):
        if control_type is not None:
            raise ValueError(
                f"control_type[{k}]={control_type!r}: ControlNet {k} is not a union ControlNet (only union nets, "
                "such as xinsir's Union/ProMax, take a condition type)"
            )
        return None
    count = net.union_config.num_control_type
    if control_type is None and not inpaint:
        raise ValueError(
            f"control_type[{k}]: ControlNet {k} is a union ControlNet; name the condition's type by name or id "
            f"({describe_types(count)})"
        )
    try:
        found = type_id(REPAINT if control_type is None else control_type, count)
    except ValueError as err:
        where = f'control[{k}]="inpaint" needs the repaint type' if control_type is None else f"control_type[{k}]"
        raise ValueError(f"{where}: {err}") from None
    if inpaint and found != UNION_TYPES[REPAINT]:
        raise ValueError(
            f'control_type[{k}]={control_type!r} (id {found}): control "inpaint" on union ControlNet {k} builds the '
            f"repaint condition (masked pixels black); give control_type repaint (id {UNION_TYPES[REPAINT]}) or none"
        )
    return found


class FusionError(ValueError):
    """A fused call that cannot be: `unit` is the unit that broke the rule (for a server's field name)."""

    def __init__(self, message: str, unit: int):
        super().__init__(message)
        self.unit = unit


def fused_units(
    nets: Sequence[ControlNet], per_net: Sequence, union_types: Sequence[int | None]
) -> list[list[int]]:
    """Groups of two or more units that run as ONE call of their shared union net (the rest run one call each):
    `fusion_groups` with the net objects as keys (a file named by several units is loaded once)."""
    counts = [n.union_config.num_control_type if isinstance(n, UnionControlNet) else None for n in nets]
    return fusion_groups([id(n) for n in nets], per_net, union_types, counts)


def fusion_groups(
    keys: Sequence[Hashable],
    per_net: Sequence,
    union_types: Sequence[int | None],
    type_counts: Sequence[int | None],
    field: str = "control_type",
) -> list[list[int]]:
    """The fusion rule, on names alone (the server checks a job with it before loading any net).

    Units fuse when they name the same union net (`keys[k]` equal) with the same control window (start, end) and
    control mode, no block scales, and a strength above 0 (a unit at 0 is not run at all). Their strengths become the
    call's per-condition scales (xinsir's multi-condition mode, diffusers' `ControlNetUnionModel` with several
    images); the outputs get the mode's per-output profile only. A group holds each type once (the type vector cannot
    mark a type twice) and at most the net's number of types (`type_counts[k]`): FusionError naming `units` and
    `field`."""
    groups: dict[tuple, list[int]] = {}
    for k, (key, o, ident) in enumerate(zip(keys, per_net, union_types, strict=True)):
        if ident is None or o.block_scales is not None or o.scale == 0:
            continue
        groups.setdefault((key, o.start, o.end, o.mode.name), []).append(k)
    fused = [units for units in groups.values() if len(units) > 1]
    for units in fused:
        names, count = ", ".join(str(k) for k in units), type_counts[units[0]]
        if len(units) > count:
            raise FusionError(
                f"units {names}: {len(units)} conditions in one fused call of their union ControlNet, which has "
                f"{count} types ({describe_types(count)}); expected at most {count} ({field}: one each)",
                units[count],
            )
        seen: dict[int, int] = {}
        for k in units:
            if union_types[k] in seen:
                raise FusionError(
                    f"units {seen[union_types[k]]}, {k}: {field} {per_net[k].control_type!r} twice in one fused "
                    f"call of their union ControlNet (type id {union_types[k]}; its type vector marks a type once); "
                    "expected a different type per unit, or another control window/mode to run one apart",
                    k,
                )
            seen[union_types[k]] = k
    return fused
