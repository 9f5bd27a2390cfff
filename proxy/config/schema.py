"""The JSON Schema of the configuration file, from the same declarations as the loader:
``royalti-proxy config-schema`` prints it; ``config/royalti-proxy.schema.json`` is the committed
copy (for editors: ``# yaml-language-server: $schema=...``).

The settings classes hold what runs (an :class:`Address`, seconds as a float, a
:class:`SecretRef`); the file holds text. So each class is mirrored by a msgspec Struct of its
file form, made with :func:`msgspec.defstruct` from its :class:`~proxy.config.fields.Spec`s
(a secret becomes ``<key>`` and ``<key>_file``; a derived field disappears; an ``auth`` variant
becomes a Struct tagged by ``type``), and :func:`msgspec.json.schema` writes the schema, with a
``schema_hook`` for what has no JSON type of its own: durations, sizes and secrets.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from .fields import Spec, applies, doc_of, literal_choices, specs
from .settings import Config
from .values import DURATION_PATTERN, SIZE_PATTERN, VARIABLE_PATTERN, Address

_FLAG_PATTERN = r"^(true|false|yes|no|True|False|TRUE|FALSE|Yes|No|YES|NO|1|0)$"
_VAR = Annotated[str, msgspec.Meta(pattern=VARIABLE_PATTERN)]


class Duration:
    """Seconds, or a string with a unit (``250ms``, ``30s``, ``5m``, ``6h``, ``1d``)."""


class Size:
    """Bytes, or a string with a unit (``512KiB``, ``1MiB``, ``10MB``)."""


class SecretText:
    """A secret given inline (normally as ``${VAR}``)."""


def _annotated(t: Any, *metas: msgspec.Meta) -> Any:
    """``Annotated[t, *metas]`` for a type made at run time."""
    return operator.getitem(Annotated, (t, *metas))


def _hook(t: type) -> dict[str, Any]:
    var = {"type": "string", "pattern": VARIABLE_PATTERN}
    if t is Duration:
        number = {"type": "number", "minimum": 0}
        return {"anyOf": [number, {"type": "string", "pattern": DURATION_PATTERN}, var]}
    if t is Size:
        number = {"type": "integer", "minimum": 0}
        return {"anyOf": [number, {"type": "string", "pattern": SIZE_PATTERN}, var]}
    if t is SecretText:
        return {"type": "string", "writeOnly": True}
    raise NotImplementedError(t)


def file_type(spec: Spec) -> Any:
    """The type of a key's value in the file (before interpolation)."""
    t, extra = spec.type, spec.extra
    if spec.is_secret:
        return SecretText
    if "parse" in extra:
        return extra.get("file_type", str)
    origin = typing.get_origin(t)
    if origin in (tuple, frozenset):
        item = typing.get_args(t)[0]
        return list[str | int] | str if item is int or "item" in extra else list[str] | str
    if origin in (Mapping, dict):
        return dict[str, str | int | float]
    if t is bool:
        return bool | Annotated[str, msgspec.Meta(pattern=_FLAG_PATTERN)] | _VAR
    if extra.get("kind") == "duration":
        return Duration
    if extra.get("kind") == "size":
        return Size
    if t is int:
        return Annotated[int, msgspec.Meta(ge=spec.ge or 0)] | _VAR
    if literal_choices(t):
        return t
    return str


def file_default(spec: Spec) -> Any:
    """The default as the file would write it; NODEFAULT when it has none worth stating."""
    if "schema_default" in spec.extra:
        return spec.extra["schema_default"]
    if not spec.has_default or "default_doc" in spec.extra or spec.is_struct:
        return msgspec.NODEFAULT
    value = spec.default()
    if isinstance(value, Address):
        return str(value)
    if isinstance(value, frozenset | tuple):
        return tuple(sorted(value))
    if isinstance(value, Mapping):
        return dict(value)
    return value


class _Builder:
    def __init__(self) -> None:
        self.made: dict[str, type] = {}
        self.untagged: set[str] = set()
        """The Structs of default variants, whose ``type`` may be left out."""
        self.either: dict[str, list[str]] = {}
        """Struct -> its required secrets, each given as <key> or <key>_file."""

    def struct(
        self, cls: type, name: str, preset: Mapping[str, Any] = {}, tag: str | None = None
    ) -> type:
        if name in self.made:
            return self.made[name]
        fields: list[tuple[str, Any, Any]] = []
        for spec in specs(cls):
            if spec.derived or spec.name in preset or not applies(spec, preset):
                continue
            fields += self.fields(spec)
            if spec.is_secret and spec.extra.get("required"):
                self.either.setdefault(name, []).append(spec.name)
        options: dict[str, Any] = {"tag_field": "type", "tag": tag} if tag else {}
        made = msgspec.defstruct(
            name,
            fields,
            kw_only=True,
            forbid_unknown_fields=True,
            namespace={"__doc__": doc_of(cls)},
            **options,
        )
        self.made[name] = made
        return made

    def fields(self, spec: Spec) -> list[tuple[str, Any, Any]]:
        env = {"x-env": spec.extra["env"]} if "env" in spec.extra else {}
        said = spec.extra.get("default_doc")
        text = f"{spec.description} Default: {said}." if said else spec.description
        meta = msgspec.Meta(description=text, extra_json_schema=env)
        t = spec.type
        if "variants" in spec.extra:
            variants = spec.extra["variants"]
            members = [
                self.struct(cls, f"{spec.name.title()}_{tag}", preset, tag)
                for tag, (cls, preset) in variants.items()
            ]
            self.untagged.add(f"{spec.name.title()}_{next(iter(variants))}")
            union = operator.getitem(typing.Union, tuple(members))
            return [(spec.name, _annotated(union, meta), msgspec.NODEFAULT)]
        if spec.is_struct:
            return [(spec.name, _annotated(self.struct(t, t.__name__) | None, meta), None)]
        origin = typing.get_origin(t)
        if origin is tuple and dataclasses.is_dataclass(typing.get_args(t)[0]):
            item = typing.get_args(t)[0]
            listed = types.GenericAlias(list, (self.struct(item, item.__name__),))
            many = _annotated(listed, meta, msgspec.Meta(min_length=1))
            return [(spec.name, many, msgspec.NODEFAULT)]
        if spec.is_secret:
            file_env = spec.extra.get("env_file")
            file_meta = msgspec.Meta(
                description=f"A file holding {spec.name}, read without its trailing newline "
                "(and again when it changes). Not together with "
                f"{spec.name}.",
                extra_json_schema={"x-env": file_env} if file_env else {},
            )
            return [
                (spec.name, Annotated[SecretText | None, meta], None),
                (f"{spec.name}_file", Annotated[str | None, file_meta], None),
            ]
        default = file_default(spec)
        if default is msgspec.NODEFAULT and spec.has_default:
            default = None
        value = file_type(spec)
        if spec.optional or default is None:
            value = value | None
        return [(spec.name, _annotated(value, meta), default)]


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the configuration file."""
    builder = _Builder()
    body = msgspec.json.schema(builder.struct(Config, "Config"), schema_hook=_hook)
    for name, definition in body["$defs"].items():
        definition.pop("title", None)
        for prop in definition["properties"].values():
            if "default" in prop and prop["default"] is None:
                del prop["default"]  # unset: said in the description when it matters
        for secret in builder.either.get(name, []):
            given = [{"required": [secret]}, {"required": [f"{secret}_file"]}]
            definition.setdefault("allOf", []).append({"anyOf": given})
        if name in builder.untagged:
            definition["required"] = [r for r in definition["required"] if r != "type"]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "royalti-proxy configuration",
        **body,
    }


def schema_text() -> str:
    """The schema as committed in config/royalti-proxy.schema.json."""
    return json.dumps(schema(), indent=2, ensure_ascii=False) + "\n"
