"""Samplers by the names users know (the web UI's and diffusers'), built from the base model's scheduler config.

The noise schedule (betas, number of training steps, prediction type, timestep spacing) belongs to the base
model and is kept; only the sampling algorithm changes. Every sampler is a diffusers scheduler
(docs/architecture.md#base-components-come-from-existing-libraries). Names are matched loosely: "DPM++ 2M Karras",
"dpmpp-2m-karras" and "dpmpp_2m_karras" are one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: the diffusers scheduler class and the config overrides that select the algorithm."""

    display_name: str
    """Name as the web UI shows it (written into PNG metadata)."""
    class_name: str
    """diffusers scheduler class."""
    overrides: dict = field(default_factory=dict)
    """Config entries that pick the algorithm variant."""


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec("DDIM", "DDIMScheduler"),
    "euler": SamplerSpec("Euler", "EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler_a": SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler"),
    "dpmpp_2m": SamplerSpec(
        "DPM++ 2M",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": SamplerSpec(
        "DPM++ 2M Karras",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": SamplerSpec("UniPC", "UniPCMultistepScheduler"),
}
_ALIASES = {"euler_ancestral": "euler_a", "dpm_2m": "dpmpp_2m", "dpm_2m_karras": "dpmpp_2m_karras"}


def canonical_sampler_name(name: str) -> str:
    """'DPM++ 2M Karras' -> 'dpmpp_2m_karras'; raises ValueError naming the choices for an unknown sampler."""
    key = re.sub(r"[\s\-]+", "_", name.strip().lower().replace("++", "pp"))
    key = _ALIASES.get(key, key)
    if key not in SAMPLERS:
        choices = ", ".join(f"{k} ({s.display_name})" for k, s in SAMPLERS.items())
        raise ValueError(f"unknown scheduler {name!r}; expected one of: {choices}")
    return key


def make_scheduler(name: str, base_config: dict):
    """A fresh scheduler of sampler `name` that keeps `base_config`'s noise schedule."""
    spec = SAMPLERS[canonical_sampler_name(name)]
    import diffusers  # imported on use: the CLI lists sampler names without loading diffusers

    cls = getattr(diffusers, spec.class_name)
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    config.update(spec.overrides)
    return cls.from_config(config)


def sampler_display_name(scheduler) -> str:
    """Web-UI name of a scheduler instance (falls back to its class name for samplers not in the table)."""
    cls_name = type(scheduler).__name__
    for spec in SAMPLERS.values():
        if spec.class_name == cls_name and all(scheduler.config.get(k) == v for k, v in spec.overrides.items()):
            return spec.display_name
    return cls_name
