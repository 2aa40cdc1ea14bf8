"""Typed settings and their command-line flags: one helper for every dataclass that a command exposes.

A settings dataclass (generate/options.py, train/config.py, builtin/config.py, ...) names each setting once, with
a default and a docstring under the field (docs/architecture.md#one-generation-one-description). Its fields may
carry metadata made by `setting(...)`: other flag spellings, bounds, choices, and which doors show the field.
`add_arguments` turns the fields into argparse options (help = the docstring), `parse_value` reads one flag's
text as the field's type, and `given_values` collects what the user actually typed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from typing import Any

from controlnet.config_docs import field_docs

SCALARS = (bool, int, float, str)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    flags: Sequence[str] = (),
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: Sequence[str] | None = None,
    cli: bool = True,
    api: bool = True,
    api_name: str | None = None,
    webui: str | None = None,
    ui: bool = True,
    kind: type | None = None,
    image: bool = False,
    metavar: str | None = None,
) -> Any:
    """A dataclass field with the metadata the doors read.

    flags: the command-line spellings (default `--field-name`; the first is the main one, the rest aliases);
    ge/gt/le: bounds, checked by `check_bounds` and copied into the API's request models; choices: the values
    accepted (names; aliases are the type's own business); cli/api: whether the field is a flag / a request field;
    api_name: the request field's name where it differs (the API's `init_image` is the schema's `image`);
    webui: the web-UI API's name for it (a dotted path inside the request, e.g. `override_settings.X`); ui: the
    web page builds a control for it; kind: the scalar a flag or request carries where the annotation is wider
    (an image field is a path on the command line and base64 on the server); image: the value is an image.
    """
    metadata = {
        "flags": tuple(flags),
        "ge": ge,
        "gt": gt,
        "le": le,
        "choices": tuple(choices) if choices is not None else None,
        "cli": cli,
        "api": api,
        "api_name": api_name,
        "webui": webui,
        "ui": ui,
        "kind": kind,
        "image": image,
        "metavar": metavar,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def meta(f: dataclasses.Field, key: str, fallback: Any = None) -> Any:
    """One metadata value of a field made by `setting` (fallback for plain fields)."""
    return f.metadata.get(key, fallback)


def flag_names(f: dataclasses.Field, prefix: str = "", hyphens: bool = True) -> list[str]:
    """The field's command-line spellings: its own flags, else `--<prefix><field-name>` (`hyphens=False`:
    `--<prefix><field_name>`, the field's own spelling, as `controlnet train`'s `--optim.max_grad_norm`)."""
    return list(meta(f, "flags", ())) or [f"--{prefix}{f.name.replace('_', '-') if hyphens else f.name}"]


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def scalar_type(annotation: Any) -> type | None:
    """The scalar a flag's text is read as: bool, int, float or str, from an annotation such as
    `int | None`, `float | Sequence[float]` or `list[float] | None` (the element of a list); None if none."""
    if annotation in SCALARS:
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = scalar_type(arg)
            if found is not None:
                return found
        return None
    if origin in (list, tuple, Sequence, typing.Sequence) or (
        isinstance(origin, type) and issubclass(origin, Sequence) and origin is not str
    ):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return scalar_type(args[0]) if args else str
    return None


def is_list(annotation: Any) -> bool:
    """The annotation is (or admits only) a list of scalars, e.g. `list[float] | None` or `tuple[str, ...]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return all(is_list(a) for a in args) and bool(args)
    return origin in (list, tuple)


def parse_value(text: str, annotation: Any, name: str = "value", *, none_words: Sequence[str] = ()) -> Any:
    """A flag's text as the field's type: bool (true/false/yes/no/1/0/on/off), int, float (finite), str, or a
    comma-separated list/tuple of those. ValueError names the flag and what was expected.

    none_words: spellings of None (any case, e.g. ("none", "null")), read as None where the annotation admits it.
    """
    if none_words and _admits_none(annotation) and text.strip().lower() in {w.lower() for w in none_words}:
        return None
    if is_list(annotation):
        kind = scalar_type(annotation) or str
        items = [parse_value(part.strip(), kind, name) for part in text.split(",") if part.strip()]
        return tuple(items) if typing.get_origin(_without_none(annotation)) is tuple else items
    kind = scalar_type(annotation) or str
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} {text!r}: expected true or false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name} {text!r}: expected an integer") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{name} {text!r}: expected a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{name} {text!r}: expected a finite number")
        return value
    return text


def _admits_none(annotation: Any) -> bool:
    if annotation is None or annotation is type(None):
        return True
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(annotation)


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def check_bounds(obj: Any) -> None:
    """Every number of a settings object (or each item of a list field) against its field's ge/gt/le bounds;
    NaN and infinities are refused. ValueError names the field, the value and the range."""
    for f in dataclasses.fields(obj):
        ge, gt, le = meta(f, "ge"), meta(f, "gt"), meta(f, "le")
        value = getattr(obj, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not math.isfinite(item):
                raise ValueError(f"{f.name}={item}: expected a finite number")
            if (ge is not None and item < ge) or (gt is not None and item <= gt) or (le is not None and item > le):
                bounds = describe_range(f.name, ge, gt, le)
                what = "an integer " if isinstance(item, int) and bounds[0] in "<>" else ""
                raise ValueError(f"{f.name}={item}: expected {what}{bounds}")


def describe_range(name: str, ge=None, gt=None, le=None) -> str:
    """The bounds in words: `0 < strength <= 1`, `>= 1`."""
    low = f"{gt:g} < " if gt is not None else (f"{ge:g} <= " if ge is not None else "")
    high = f" <= {le:g}" if le is not None else ""
    if low and high:
        return f"{low}{name}{high}"
    return (f">= {ge:g}" if ge is not None else f"> {gt:g}") if low else f"<= {le:g}"


def add_arguments(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    *,
    prefix: str = "",
    dest_prefix: str = "",
    repeat: bool = False,
    exclude: Sequence[str] = (),
    suppress_defaults: bool = False,
    show_defaults: bool | None = None,
    hyphens: bool = True,
    switches: bool = True,
) -> list[str]:
    """One option per field of `cls` shown on the command line; returns the field names added.

    repeat: the option may be given several times (`action="append"`: one value per ControlNet, say);
    suppress_defaults: an option not given leaves no attribute (so that only what the user typed overrides a
    config file); dest is `<dest_prefix><field name>`. bool fields become `--flag/--no-flag`; list fields read
    comma-separated values. show_defaults: the help ends with the field's default (None: unless the defaults are
    suppressed; True: the dataclass default even then, which a config file may replace; never for repeated
    options). hyphens=False spells flags with the field's underscores (`flag_names`); switches=False makes bool
    fields take a value like any other (`--model.ema false`) instead of `--flag/--no-flag`.
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    added = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or not meta(f, "cli", True) or not f.init:
            continue
        annotation = meta(f, "kind") or hints[f.name]
        kind = scalar_type(annotation)
        if kind is None:
            continue  # not a command-line value (an image object, a dict)
        default = field_default(f)
        help_text = docs.get(f.name, "")
        shown_default = show_defaults if show_defaults is not None else not suppress_defaults
        if shown_default and not repeat and default is not None:
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            help_text = f"{help_text} (default: {shown})"
        kwargs: dict[str, Any] = {"dest": f"{dest_prefix}{f.name}", "help": help_text.replace("%", "%%")}
        if not (kind is bool and not repeat and switches) and not meta(f, "choices"):
            kwargs["metavar"] = meta(f, "metavar") or f.name.upper()
        if meta(f, "choices") and not repeat:
            kwargs["choices"] = list(meta(f, "choices"))
        if kind is bool and not repeat and not is_list(annotation) and switches:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            name = flag_names(f, prefix, hyphens)[0]
            kwargs["type"] = _flag_type(annotation, name)
            if repeat:
                kwargs["action"] = "append"
        if suppress_defaults:
            kwargs["default"] = argparse.SUPPRESS
        elif repeat:
            kwargs["default"] = None
        else:
            kwargs["default"] = default
        parser.add_argument(*flag_names(f, prefix, hyphens), **kwargs)
        added.append(f.name)
    return added


def _flag_type(annotation: Any, name: str):
    def convert(text: str):
        try:
            return parse_value(text, annotation, name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = (scalar_type(annotation) or str).__name__  # argparse names the type in its messages
    return convert


def given_values(args: argparse.Namespace, cls: type, dest_prefix: str = "") -> dict[str, Any]:
    """{field name: value} for the fields of `cls` present in `args` (absent: suppressed and not given)."""
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{dest_prefix}{f.name}"
        if hasattr(args, key):
            values[f.name] = getattr(args, key)
    return values
