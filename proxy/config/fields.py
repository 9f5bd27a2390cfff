"""How a setting is declared: ``Annotated[<runtime type>, Meta(...)]`` on a field of a frozen
dataclass, read back here as a :class:`Spec` by the loader, the schema and the docs.

:class:`Meta` has the fields of :class:`msgspec.Meta` that the declarations use: the
description, the numeric bound (``ge``) and, in ``extra``, what only this package reads. It is
a class of its own rather than ``msgspec.Meta`` itself so that the running proxy never imports
msgspec (1.0 MiB of an idle process, docs/performance.md): only ``royalti-proxy config-schema``
does, and :mod:`.schema` turns each :class:`Spec` into msgspec's annotations there.

``extra`` holds:

``env``/``env_file``
    the variable (of the environment-only mode) that sets the key / its ``_file`` form;
``required``
    the key must be given: ``True`` (said as "required when type is ...") or the words to say;
``parse``
    a function from the raw (interpolated) value to the setting, raising ValueError(reason);
``item``
    the same for each item of a list (``frozenset``/``tuple`` fields);
``kind``
    ``duration`` or ``size``: the number may be given with a unit;
``path``
    ``watch`` (a file watched for changes) or ``read`` (also checked readable at load);
``derived``
    resolved at load from other settings, not a key of the file;
``only``
    preset values a variant must have for the key to exist (``{"grant": "password"}``);
``variants``/``tag``
    a tagged union: tag value -> (class, preset values);
``default_doc``/``schema_default``
    the default as documentation says it, when the field's own default is not it;
``type_doc``
    what documentation calls the value of a ``parse`` field.

A field typed ``Secret`` or ``SecretRef`` (or a class with ``from_ref``) is a secret: the file
gives it as ``<key>`` or ``<key>_file``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

from proxy.secret import Secret

from .values import SecretRef


@dataclass(frozen=True, slots=True, eq=False)
class Meta:
    """One declaration's metadata (see the module docstring); named and shaped after
    :class:`msgspec.Meta`, which :mod:`.schema` builds from it."""

    description: str | None = None
    ge: int | None = None
    extra: dict[str, Any] | None = None


DURATION = Meta(extra={"kind": "duration"})
SIZE = Meta(extra={"kind": "size"})


def key(
    description: str,
    *,
    ge: int | None = None,
    env: str | None = None,
    env_file: str | None = None,
    required: str | bool | None = None,
    parse: Callable[[Any], Any] | None = None,
    item: Callable[[str], Any] | None = None,
    path: Literal["watch", "read"] | None = None,
    derived: bool = False,
    only: dict[str, str] | None = None,
    variants: dict[str, tuple[type, dict[str, Any]]] | None = None,
    tag: str | None = None,
    default_doc: str | None = None,
    schema_default: Any = None,
    type_doc: str | None = None,
) -> Meta:
    """The :class:`Meta` that declares one setting (see the module docstring)."""
    given = {
        "env": env,
        "env_file": env_file,
        "required": required,
        "parse": parse,
        "item": item,
        "path": path,
        "derived": derived or None,
        "only": only,
        "variants": variants,
        "tag": tag,
        "default_doc": default_doc,
        "schema_default": schema_default,
        "type_doc": type_doc,
    }
    extra = {k: v for k, v in given.items() if v is not None}
    return Meta(description=description, ge=ge, extra=extra)


@dataclass(frozen=True)
class Spec:
    """One field of a settings class, as declared."""

    name: str
    type: Any
    """The runtime type without ``Annotated`` and without ``| None``."""
    optional: bool
    description: str
    ge: int | None
    extra: dict[str, Any]
    field: dataclasses.Field[Any]

    @property
    def derived(self) -> bool:
        return bool(self.extra.get("derived"))

    @property
    def is_secret(self) -> bool:
        return self.type in (Secret, SecretRef) or hasattr(self.type, "from_ref")

    @property
    def is_struct(self) -> bool:
        """A section of its own (not a value parsed from one string, nor a secret)."""
        return dataclasses.is_dataclass(self.type) and not (self.is_secret or "parse" in self.extra)

    @property
    def has_default(self) -> bool:
        f = self.field
        return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING

    def default(self) -> Any:
        f = self.field
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        return None if f.default is dataclasses.MISSING else f.default


#: Field declarations for settings classes defined elsewhere (``proxy.egress.ProxySetting``),
#: which cannot import this package: class -> field name -> Meta.
OVERLAYS: dict[type, dict[str, Meta]] = {}

#: Cross-field checks for such classes (the others have a ``_check`` method).
CHECKS: dict[type, Callable[[Any, Any], Any]] = {}


def unwrap(hint: Any) -> tuple[Any, bool, list[Meta]]:
    """``(type, optional, metas)`` of an annotation."""
    metas: list[Meta] = []
    optional = False
    while True:
        if typing.get_origin(hint) is typing.Annotated:
            metas += [m for m in hint.__metadata__ if isinstance(m, Meta)]
            hint = hint.__origin__
            continue
        if typing.get_origin(hint) in (Union, types.UnionType):
            args = typing.get_args(hint)
            rest = [a for a in args if a is not type(None)]
            if len(rest) < len(args):
                optional = True
                hint = rest[0] if len(rest) == 1 else Union[tuple(rest)]  # noqa: UP007
                continue
        return hint, optional, metas


def specs(cls: type) -> tuple[Spec, ...]:
    """The fields of a settings class, in declaration order."""
    return _specs(cls)


@functools.cache
def _specs(cls: Any) -> tuple[Spec, ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    overlay = OVERLAYS.get(cls, {})
    out: list[Spec] = []
    for f in dataclasses.fields(cls):
        base, optional, metas = unwrap(hints[f.name])
        if f.name in overlay:
            metas.append(overlay[f.name])
        extra: dict[str, Any] = {}
        for m in metas:
            extra.update(m.extra or {})
        description = " ".join(m.description for m in metas if m.description)
        ge = next((int(m.ge) for m in metas if m.ge is not None), None)
        out.append(Spec(f.name, base, optional, description, ge, extra, f))
    return tuple(out)


def file_keys(spec: Spec) -> tuple[str, ...]:
    """The keys of the file a field is given by."""
    if spec.derived:
        return ()
    return (spec.name, f"{spec.name}_file") if spec.is_secret else (spec.name,)


def applies(spec: Spec, preset: Mapping[str, Any]) -> bool:
    """Whether a field exists in the variant with these preset values."""
    only = spec.extra.get("only") or {}
    return all(preset.get(k) == v for k, v in only.items())


def literal_choices(t: Any) -> tuple[str, ...] | None:
    return tuple(typing.get_args(t)) if typing.get_origin(t) is Literal else None


def doc_of(cls: type) -> str:
    """A class's docstring as one paragraph of Markdown."""
    return " ".join((cls.__doc__ or "").replace("``", "`").split())
