"""Annotator options as typed pydantic models: their JSON schema for GET /v1/annotators, their checks for requests.

The options are the annotator dataclasses' own fields (annotate/registry.py `annotator_options`), minus the ones a
client may not set (service.SERVER_ONLY_ANNOTATOR_OPTIONS: a weights path, the device). One model per annotator,
`extra="forbid"`, so an unknown option is refused naming it.
"""

from __future__ import annotations

import dataclasses
import typing
from functools import cache

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from controlnet.annotate.registry import annotator_class, annotator_options
from controlnet.serve.limits import MAX_SIDE
from controlnet.serve.service import SERVER_ONLY_ANNOTATOR_OPTIONS, FieldError, served_annotators
from controlnet.settings_cli import meta

# What a request may ask of an annotator, on top of the option's own range (its `setting(ge=, le=)` in annotate/):
# the short side it works at costs memory and time with its square (16384 took 4.4 GB), so it is capped like an
# output side (serve/limits.py).
OPTION_CAPS = {"detect_resolution": {"le": MAX_SIDE}}
MAX_LIST_OPTION_ITEMS = 16  # a list option's length (softedge's sigmas: each is one more pass over the image)


def _bounds(key: str, f: dataclasses.Field) -> dict:
    """The option's own range (annotate/: `setting(ge=, gt=, le=)`), narrowed by OPTION_CAPS."""
    bounds = {k: meta(f, k) for k in ("ge", "gt", "le") if meta(f, k) is not None}
    for k, cap in OPTION_CAPS.get(key, {}).items():
        bounds[k] = min(bounds[k], cap) if k in bounds else cap
    return bounds


def _option_type(hint, bounds: dict):
    """The option's type with its bounds on each number (a list option's on each item)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (tuple, list) and args:
        return list[typing.Annotated[args[0], Field(**bounds)]]
    if len(args) == 1 and type(None) in typing.get_args(hint):  # X | None
        return typing.Annotated[args[0], Field(**bounds)] | None
    return typing.Annotated[hint, Field(**bounds)] if bounds else hint


@cache
def options_model(name: str) -> type[BaseModel]:
    """The annotator's client-settable options with their ranges; numbers must be finite (NaN passed range checks
    written as `not value < low`, and an infinite blur sigma grew the server until the kernel killed it)."""
    cls = annotator_class(name)
    hints = typing.get_type_hints(cls)
    fields = {}
    for key, f in annotator_options(name).items():
        if key in SERVER_ONLY_ANNOTATOR_OPTIONS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else ...
        hint = _option_type(hints.get(key, typing.Any), _bounds(key, f))
        sized = {"max_length": MAX_LIST_OPTION_ITEMS} if typing.get_origin(hint) is list else {}
        fields[key] = (hint, Field(default, **sized))
    config = ConfigDict(extra="forbid", allow_inf_nan=False)
    return create_model(f"{name}_options", __config__=config, **fields)


def options_schema(name: str) -> dict:
    return options_model(name).model_json_schema()


def describe_annotators() -> list[dict]:
    return [{"name": n, "options": options_schema(n)} for n in served_annotators()]


def checked_options(name: str, options: dict, annotator_field: str, field: str) -> dict:
    """`options` validated against the annotator's fields (types coerced as pydantic does); FieldError if not.

    `annotator_field` / `field` name the annotator and its options as the request spells them."""
    if name not in served_annotators():
        raise FieldError(
            annotator_field, f"unknown annotator {name!r}; expected one of {', '.join(served_annotators())}"
        )
    try:
        values = options_model(name).model_validate(options or {})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = "not an option of this annotator" if first["type"] == "extra_forbidden" else first["msg"]
        raise FieldError(f"{field}.{where}" if where else field, message) from None
    given = {k: v for k, v in values.model_dump().items() if k in set(options or {})}
    try:  # the annotator's own checks across options (canny: high >= low), before anything is queued
        annotator_class(name)(**given)
    except ValueError as err:
        key = str(err).split(":")[0].split("=")[0]
        raise FieldError(f"{field}.{key}" if key in annotator_options(name) else field, str(err)) from None
    return given
