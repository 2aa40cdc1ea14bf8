"""Several ControlNets at once, and the per-block scales users control.

Paper, Sec. 3.4 / Fig. 7: multiple conditions compose by directly **adding** the ControlNets' outputs to the
locked UNet, with no extra weighting or interpolation. On top of that, every net has a strength (the
"control weight" users know), optionally one scale per output block, and the reference code's
`only_mid_control` switch, which feeds only the middle-block residual and leaves the skip connections alone.
Which per-block scales a generation uses (guess mode, CFG resolution weighting) is a sampling rule:
generate/guidance.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from controlnet.model.controlnet import ControlNet, ControlNetOutput


@dataclass
class ControlTerm:
    """One term of the residual sum: a ControlNet, its condition and how strongly it steers."""

    net: ControlNet
    cond: torch.Tensor | None = None
    """Condition image (B, C, H, W) in [0, 1]; or give `hint`, its embedding computed once per generation."""
    hint: torch.Tensor | None = None
    scale: float = 1.0
    """Strength: multiplies every residual of this net (the paper's Fig. 7 composition uses 1.0 for all)."""
    block_scales: Sequence[float] | None = None
    """Optional per-output scales (13 for SD1.5, 10 for SDXL), multiplied with `scale`."""
    added_cond_kwargs: dict | None = field(default=None)

    def __post_init__(self):
        if self.scale < 0:
            raise ValueError(f"control scale must be >= 0, got {self.scale}")
        if self.block_scales is not None and len(self.block_scales) != self.net.num_control_outputs:
            raise ValueError(
                f"block_scales has {len(self.block_scales)} values; this ControlNet has "
                f"{self.net.num_control_outputs} outputs"
            )

    def output_scales(self) -> list[float]:
        per_block = self.block_scales or [1.0] * self.net.num_control_outputs
        return [self.scale * s for s in per_block]


def compose(
    terms: Sequence[ControlTerm],
    sample: torch.Tensor,
    timestep: torch.Tensor | int | float,
    encoder_hidden_states: torch.Tensor,
    only_mid_control: bool = False,
) -> ControlNetOutput | None:
    """Sum the residuals of every term (paper Sec. 3.4). Returns None when no term contributes.

    Terms with scale 0 are not evaluated at all (their residuals would be zero), which also makes
    "every ControlNet at scale 0" exactly the base model.
    """
    total: ControlNetOutput | None = None
    for term in terms:
        scales = term.output_scales()
        if not any(scales):
            continue
        out = term.net(
            sample,
            timestep,
            encoder_hidden_states,
            cond=term.cond,
            hint=term.hint,
            conditioning_scale=scales,
            added_cond_kwargs=term.added_cond_kwargs,
        )
        total = add_residuals(total, out)
    if total is not None and only_mid_control:
        total = mid_only(total)
    return total


def add_residuals(total: ControlNetOutput | None, out: ControlNetOutput) -> ControlNetOutput:
    """total + out, residual by residual (paper Sec. 3.4: ControlNets compose by adding their outputs, with no
    extra weighting); `total` None is the empty sum. down: one (B, C_i, h_i, w_i) per UNet skip; mid: (B, C, h, w)."""
    if total is None:
        return out
    return ControlNetOutput(
        down=[a + b for a, b in zip(total.down, out.down, strict=True)],
        mid=total.mid + out.mid,
    )


def mid_only(out: ControlNetOutput) -> ControlNetOutput:
    """The reference code's `only_mid_control`: the skip connections get nothing (zeros of their shapes), the
    middle block gets the control."""
    return ControlNetOutput(down=[torch.zeros_like(d) for d in out.down], mid=out.mid)


def unet_residual_kwargs(out: ControlNetOutput | None) -> dict:
    """Keyword arguments for diffusers' UNet forward: empty (plain base model) when there is no control."""
    if out is None:
        return {}
    return {"down_block_additional_residuals": tuple(out.down), "mid_block_additional_residual": out.mid}


class MultiControlNet(torch.nn.Module):
    """Holds several ControlNets (so `.to()`, `.eval()` and state dicts cover all of them) and composes them."""

    def __init__(self, nets: Sequence[ControlNet]):
        super().__init__()
        if not nets:
            raise ValueError("MultiControlNet needs at least one ControlNet")
        counts = {n.num_control_outputs for n in nets}
        if len(counts) != 1:
            raise ValueError(f"ControlNets disagree on the number of outputs {sorted(counts)}: different bases?")
        self.nets = torch.nn.ModuleList(nets)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor,
        conds: Sequence[torch.Tensor],
        scales: Sequence[float] | float = 1.0,
        block_scales: Sequence[Sequence[float] | None] | None = None,
        only_mid_control: bool = False,
        added_cond_kwargs: dict | None = None,
    ) -> ControlNetOutput | None:
        n = len(self.nets)
        if len(conds) != n:
            raise ValueError(f"got {len(conds)} condition images for {n} ControlNets; expected one per net")
        scales = [float(scales)] * n if isinstance(scales, (int, float)) else list(scales)
        block_scales = list(block_scales) if block_scales is not None else [None] * n
        if len(scales) != n or len(block_scales) != n:
            raise ValueError(f"scales/block_scales need one entry per ControlNet ({n})")
        terms = [
            ControlTerm(net, cond=c, scale=s, block_scales=b, added_cond_kwargs=added_cond_kwargs)
            for net, c, s, b in zip(self.nets, conds, scales, block_scales, strict=True)
        ]
        return compose(terms, sample, timestep, encoder_hidden_states, only_mid_control)
