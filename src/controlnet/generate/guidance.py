"""Classifier-free guidance with ControlNets: control modes, guess mode, CFG resolution weighting, control windows.

Paper, Sec. 3.4 ("Classifier-free guidance resolution weighting"): Stable Diffusion samples with classifier-free
guidance (CFG), eps = eps_uc + beta_cfg * (eps_c - eps_uc). The condition image can be added to both eps_uc and
eps_c, or to eps_c only. Adding it to both removes CFG's pull entirely when no prompt is given; adding it to eps_c
only makes guidance very strong. The paper's fix adds the condition to eps_c only and multiplies the connection
of block i by w_i = 64 / h_i, h_i being the block's side in latent pixels (64 for SD at 512 px).

The control modes users know from the web-UI extension are combinations of two switches:
- "balanced": the ControlNet's residuals go to both CFG branches with the user's strength;
- "prompt" ("My prompt is more important"): both branches, but output i of n scaled down by
  0.825 ** (n - 1 - i) ("soft injection": the deep outputs keep their strength, fine detail is left to the prompt);
- "controlnet" ("ControlNet is more important", the reference's guess mode): the same soft scales, on the
  conditional branch only, so CFG amplifies the control itself; it works with an empty prompt;
- "cfg_resolution": the paper's weighting above (conditional branch only, w_i = H / h_i with H the latent side).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ControlMode:
    """How the ControlNets' residuals enter classifier-free guidance."""

    name: str
    display_name: str
    """The web UI's label: written into infotexts and PNG metadata, shown by the page, read back."""
    conditional_only: bool
    """Residuals go to the conditional branch only (the unconditional branch gets none)."""
    per_block: str
    """Per-output profile: 'flat' (1.0), 'soft' (guess-mode decay) or 'resolution' (paper's 64 / h_i)."""


CONTROL_MODES: dict[str, ControlMode] = {
    "balanced": ControlMode("balanced", "Balanced", False, "flat"),
    "prompt": ControlMode("prompt", "My prompt is more important", False, "soft"),
    "controlnet": ControlMode("controlnet", "ControlNet is more important", True, "soft"),
    "cfg_resolution": ControlMode(
        "cfg_resolution", "CFG resolution weighting (paper Sec. 3.4)", True, "resolution"
    ),
}
# The web UI's API sends its ControlMode enum as ints 0, 1, 2 (older clients); the labels are `display_name`.
WEBUI_CONTROL_MODES = ("balanced", "prompt", "controlnet")
_MODE_ALIASES = {  # other spellings (lower case); the labels are read through CONTROL_MODES' display names
    "guess": "controlnet",
    "guess_mode": "controlnet",
    "resolution": "cfg_resolution",
}
GUESS_MODE_FORMS = ("reference", "diffusers")

# Guess mode ("ControlNet is more important") in the reference (lllyasviel/ControlNet, gradio apps) scales
# output i of 13 by 0.825 ** (12 - i): the deepest (middle) output keeps 1.0 and the shallowest gets
# 0.825 ** 12 ~= 0.0994, i.e. ~0.1, so coarse semantics come from the condition while fine detail is free.
GUESS_MODE_BASE_REFERENCE = 0.825
# diffusers spreads the same range as torch.logspace(-1, 0, n): ratio 10 ** (1 / 12) ~= 0.8254 for n = 13.
GUESS_MODE_FLOOR_DIFFUSERS = 0.1


def guess_mode_scales(num_outputs: int, form: str = "reference") -> list[float]:
    """Per-output scales of guess mode, shallowest skip first, middle block last.

    form="reference": 0.825 ** (n - 1 - i), as the original implementation;
    form="diffusers": logspace from 0.1 to 1.0, as diffusers' pipelines (differs by < 0.5% for n = 13).
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    if form == "reference":
        return [GUESS_MODE_BASE_REFERENCE ** (num_outputs - 1 - i) for i in range(num_outputs)]
    if form == "diffusers":
        return torch.logspace(math.log10(GUESS_MODE_FLOOR_DIFFUSERS), 0, num_outputs).tolist()
    raise ValueError(f"guess-mode form {form!r}; expected one of {', '.join(GUESS_MODE_FORMS)}")


def control_mode(name: str | int) -> ControlMode:
    """Look a control mode up by name, web-UI label (`display_name`) or the web UI's int (0, 1, 2:
    WEBUI_CONTROL_MODES); raises ValueError naming the choices."""
    if isinstance(name, int) and not isinstance(name, bool) and 0 <= name < len(WEBUI_CONTROL_MODES):
        return CONTROL_MODES[WEBUI_CONTROL_MODES[name]]
    key = name.strip().lower() if isinstance(name, str) else ""
    by_label = {mode.display_name.lower(): mode for mode in CONTROL_MODES.values()}
    if key in by_label:  # the labels written into infotexts and PNG metadata read back
        return by_label[key]
    key = _MODE_ALIASES.get(key, key).replace("-", "_").replace(" ", "_")
    if key not in CONTROL_MODES:
        labels = ", ".join(repr(CONTROL_MODES[m].display_name) for m in WEBUI_CONTROL_MODES)
        raise ValueError(
            f"unknown control mode {name!r}; expected one of {', '.join(CONTROL_MODES)} (or the web "
            f"UI's 0, 1, 2 or {labels})"
        )
    return CONTROL_MODES[key]


def cfg_resolution_weights(output_heights: Sequence[int]) -> list[float]:
    """Paper Sec. 3.4: w_i = 64 / h_i for SD at 512 px; in general H / h_i with H the largest (latent) side.

    output_heights: the spatial height of each ControlNet output (13 for SD1.5: 64,64,64,32,...,8,8 at 512 px).
    Note the profile: the shallowest outputs keep 1, the deepest get 8 (ratio 8, vs 10 for guess mode's 0.825**12).
    """
    # the paper's 64 is SD's latent side at 512 px (the shallowest blocks' size); dividing by the latent side of the
    # image actually generated gives 64 at 512 px and keeps the profile at other sizes
    full = max(output_heights)
    return [full / h for h in output_heights]


def block_profile(mode: ControlMode, output_heights: Sequence[int], guess_form: str = "reference") -> list[float]:
    """Per-output multipliers of `mode` for a net whose outputs have the given heights (shallowest first)."""
    n = len(output_heights)
    if mode.per_block == "flat":
        return [1.0] * n
    if mode.per_block == "soft":
        return guess_mode_scales(n, form=guess_form)
    return cfg_resolution_weights(output_heights)


def in_window(step: int, num_steps: int, start: float, end: float) -> bool:
    """True when sampler step `step` (0-based, of `num_steps`) lies inside the control window [start, end].

    start/end are fractions of the schedule (0 = first, pure-noise step; 1 = last). A step covers the interval
    [step / n, (step + 1) / n] and is inside when the whole interval is (the convention of the web UI and
    diffusers, so windows mean the same thing everywhere).
    """
    return step / num_steps >= start and (step + 1) / num_steps <= end


def check_window(start: float, end: float, what: str = "control window") -> None:
    """Raise a ValueError unless 0 <= start < end <= 1."""
    if not (0.0 <= start < end <= 1.0):
        raise ValueError(f"{what}: start={start}, end={end}; expected 0 <= start < end <= 1")


def apply_cfg(eps: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """eps = eps_uc + s * (eps_c - eps_uc) on a (2B, ...) batch ordered [unconditional, conditional] -> (B, ...)."""
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def pad_unconditional(residual: torch.Tensor) -> torch.Tensor:
    """(B, ...) residual of the conditional branch -> (2B, ...) with zeros for the unconditional branch."""
    return torch.cat([torch.zeros_like(residual), residual])
