"""The native API's request models, derived from the generation schema (generate/options.py).

Each field of `ControlUnit` and `GenerationOptions` shown to the API (`setting(api=True)`) becomes a pydantic field
of the same name (or its `api_name`), type, default, bounds and description (the field's docstring); the server
adds only what a request may cost (`caps`: longest text, largest side, most steps). So a setting added to the
schema is a request field without another edit (docs/architecture.md#one-generation-one-description).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from controlnet.config_docs import field_docs
from controlnet.settings_cli import meta

IMAGE_NOTE = "base64 or a data: URI (file paths are refused)"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def api_name(f: dataclasses.Field) -> str:
    return meta(f, "api_name") or f.name


def api_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a settings dataclass that the API shows, in order."""
    return [f for f in dataclasses.fields(cls) if meta(f, "api", True)]


def _annotation(f: dataclasses.Field, hint: Any) -> Any:
    optional = f.default is None
    if meta(f, "choices"):
        kind = Literal[tuple(meta(f, "choices"))]
    elif meta(f, "kind"):
        kind = meta(f, "kind")
    elif typing.get_origin(hint) is dict or hint is dict:
        return dict[str, Any]
    else:
        return hint
    return kind | None if optional else kind


def _field(f: dataclasses.Field, doc: str, caps: dict) -> Any:
    bounds = {key: meta(f, key) for key in ("ge", "gt", "le") if meta(f, key) is not None}
    for key, value in caps.items():  # the tighter of the schema's bound and the server's cap
        if key == "le" and "le" in bounds:
            value = min(value, bounds["le"])
        if key == "ge" and "ge" in bounds:
            value = max(value, bounds["ge"])
        bounds[key] = value
    description = doc
    if meta(f, "image"):
        description = f"{doc} ({IMAGE_NOTE})"
    if f.default_factory is not dataclasses.MISSING:
        return Field(default_factory=f.default_factory, description=description, **bounds)
    default = f.default if f.default is not dataclasses.MISSING else ...
    return Field(default, description=description, **bounds)


def request_model(cls: type, name: str, caps: dict[str, dict] | None = None, **extra: Any) -> type[BaseModel]:
    """A strict pydantic model of `cls`'s API fields (unknown fields refused, NaN and infinities refused);
    `extra`: more fields as (annotation, Field) pairs, placed first."""
    caps = caps or {}
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    fields = dict(extra)
    for f in api_fields(cls):
        fields[api_name(f)] = (
            _annotation(f, hints[f.name]),
            _field(f, docs.get(f.name, ""), caps.get(f.name, {})),
        )
    config = ConfigDict(extra="forbid", allow_inf_nan=False)
    return create_model(name, __config__=config, **fields)


def settings_from_request(cls: type, body: BaseModel, decode_image=None, where: str = "") -> dict[str, Any]:
    """{schema field name: value} of a request model made by `request_model`; image fields go through
    `decode_image(value, field_label)` when given and not null."""
    values = {}
    for f in api_fields(cls):
        value = getattr(body, api_name(f))
        if meta(f, "image") and value is not None and decode_image is not None:
            value = decode_image(value, f"{where}{api_name(f)}")
        values[f.name] = value
    return values
