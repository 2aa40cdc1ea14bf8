"""An annotator's options as form controls, from its JSON schema (GET /v1/annotators: serve/annotators.py).

The schema gives each option's type and default; a number becomes a slider when RANGES knows its sensible range
(the ranges the web-UI extension's preprocessor sliders use where it has the same option), else a number box.
Booleans are checkboxes, strings text boxes, lists JSON text. `detect_resolution` is left to the page (one slider
per unit, shared by every annotator that has it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from controlnet.serve.annotators import options_schema

SHARED_OPTIONS = ("detect_resolution",)
# (annotator, option) -> (min, max, step)
RANGES: dict[tuple[str, str], tuple[float, float, float]] = {
    ("canny", "low_threshold"): (1, 255, 1),
    ("canny", "high_threshold"): (1, 255, 1),
    ("lines", "min_length"): (1, 200, 1),
    ("scribble", "threshold"): (0, 510, 1),
    ("scribble", "min_area"): (0, 1024, 1),
    ("scribble", "stroke_width"): (1, 15, 1),
    ("softedge", "percentile"): (50, 100, 0.5),
    ("lineart_standard", "gaussian_sigma"): (0.5, 20, 0.5),
    ("lineart_standard", "intensity_threshold"): (0, 64, 1),
    ("normal", "flatness"): (0, 20, 0.1),
    ("normal", "background_threshold"): (0, 1, 0.01),
    ("shuffle", "noise_period"): (8, 1024, 8),
    ("tile", "down_sampling_rate"): (1, 8, 0.5),
    ("tile", "blur_sigma"): (0, 10, 0.1),
}


@dataclass(frozen=True)
class OptionControl:
    """One option's control: `kind` is slider | number | checkbox | text | json."""

    annotator: str
    name: str
    kind: str
    default: object
    label: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None

    def value(self, raw):
        """The control's value as the annotator option (ValueError naming the option when it cannot be)."""
        if self.kind == "json":
            try:
                return json.loads(raw) if isinstance(raw, str) else raw
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{self.annotator} {self.name}: expected JSON such as {json.dumps(self.default)} ({err})"
                ) from None
        if self.kind in ("slider", "number") and raw is not None:
            return int(raw) if self._integer else float(raw)
        return raw

    @property
    def _integer(self) -> bool:
        return isinstance(self.default, int) and not isinstance(self.default, bool) and (self.step or 1) >= 1


def _types(prop: dict) -> set[str]:
    return {p.get("type") for p in prop.get("anyOf", [prop])} - {None, "null"}


def option_controls(annotator: str) -> list[OptionControl]:
    """The controls of `annotator`'s own options (not the shared ones), in the schema's order."""
    controls = []
    for name, prop in options_schema(annotator)["properties"].items():
        if name in SHARED_OPTIONS:
            continue
        types, default, label = _types(prop), prop.get("default"), prop.get("title", name)
        rng = RANGES.get((annotator, name))
        if types & {"integer", "number"} and rng is not None and default is not None:
            controls.append(OptionControl(annotator, name, "slider", default, label, *rng))
        elif types & {"integer", "number"}:
            controls.append(OptionControl(annotator, name, "number", default, label))
        elif "boolean" in types:
            controls.append(OptionControl(annotator, name, "checkbox", bool(default), label))
        elif types & {"array", "object"}:
            controls.append(OptionControl(annotator, name, "json", json.dumps(default), label))
        else:
            controls.append(OptionControl(annotator, name, "text", "" if default is None else str(default), label))
    return controls


def has_option(annotator: str, name: str) -> bool:
    return name in options_schema(annotator)["properties"]


def collect_options(annotator: str, controls: list[OptionControl], raw_values: list, detect_resolution) -> dict:
    """The option dict for `annotator` from the values of its controls (same order as `controls`)."""
    options = {c.name: c.value(v) for c, v in zip(controls, raw_values, strict=True) if c.annotator == annotator}
    if detect_resolution and has_option(annotator, "detect_resolution"):
        options["detect_resolution"] = int(detect_resolution)
    return options
