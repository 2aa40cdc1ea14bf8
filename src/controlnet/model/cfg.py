"""Classifier-free guidance (Ho & Salimans 2022), the sampling rule of paper Sec. 3.4: eps = eps_uc + s (eps_c - eps_uc).

One function shared by the pipeline (generate/pipeline.py) and the built-in base's sampler (builtin/base.py). It
lives under model/ because the built-in base sits below the generation layer (generate/base.py loads it), so the
two can only share it from a part both may import.
"""

from __future__ import annotations

import torch


def apply_cfg(eps: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """eps = eps_uc + s * (eps_c - eps_uc) on a (2B, ...) batch ordered [unconditional, conditional] -> (B, ...)."""
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
