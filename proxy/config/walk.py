"""The generic loader: converts raw configuration (parsed YAML, or the environment) into the
settings classes field by field, from their declarations (:mod:`proxy.config.fields`), and
collects every problem with its key path instead of stopping at the first.

Per class: each field in declaration order (a nested class is walked likewise), then the class's
cross-field ``_check``, then the keys nobody read ("unknown key").
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from proxy.egress import ProxyEnvironment
from proxy.secret import Secret

from .fields import CHECKS, Spec, applies, file_keys, literal_choices, specs
from .values import SecretRef, interpolate, parse_duration, parse_size, read_secret_file

T = TypeVar("T")


class _Missing:
    """No usable value: the key is absent, null, or its value was reported as a problem."""


MISSING: Any = _Missing()


@dataclass
class Walk:
    """What one load shares across the walk."""

    env: Mapping[str, str]
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    """Every secret and TLS file the configuration names (watched for changes)."""
    proxy_env: ProxyEnvironment = field(default_factory=ProxyEnvironment)


@dataclass
class Checks:
    """What a class's ``_check`` sees: its raw mapping, where it is, and where to report."""

    walk: Walk
    path: str
    data: dict[str, Any]
    index: int | None = None
    """The position in its list, for an item of one (an upstream)."""
    tags: dict[str, str] = field(default_factory=dict)

    def where(self, key: str | None) -> str:
        if key is None:
            return self.path or "(top level)"
        return f"{self.path}.{key}" if self.path else key

    def problem(self, key: str | None, reason: str) -> None:
        self.walk.problems.append(f"{self.where(key)}: {reason}")

    def given(self, key: str) -> bool:
        """Whether the file gives ``key`` a value (an empty string is none)."""
        return self.data.get(key) not in (None, "")

    def present(self, key: str) -> bool:
        """Whether the file has ``key`` at all (``null`` is absent; an empty string is not)."""
        return self.data.get(key) is not None


def read(
    cls: type[T],
    data: object,
    walk: Walk,
    path: str = "",
    *,
    preset: Mapping[str, Any] | None = None,
    when: str = "",
    index: int | None = None,
) -> T:
    """An instance of the settings class ``cls`` from its raw mapping ``data``."""
    preset = dict(preset or {})
    c = Checks(walk, path, {}, index)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        c.problem(None, "must be a mapping")
        data = {}
    c.data = data
    seen: set[str] = set()
    values: dict[str, Any] = {}
    for spec in specs(cls):
        if spec.name in preset:
            values[spec.name] = preset[spec.name]
            continue
        if spec.derived or not applies(spec, preset):
            continue
        seen.update(file_keys(spec))
        value = _field(spec, c, when)
        if value is MISSING:
            if spec.has_default:
                continue
            value = _placeholder(spec)
        values[spec.name] = value
    for spec in specs(cls):
        if spec.name not in values and not spec.has_default:
            values[spec.name] = c.tags.get(spec.extra.get("tag", ""), _placeholder(spec))
    obj = cls(**values)
    check = getattr(cls, "_check", None) or CHECKS.get(cls)
    if check is not None:
        obj = check(obj, c)
    for k in data:
        if k not in seen:
            c.problem(str(k), "unknown key")
    return obj


def _placeholder(spec: Spec) -> Any:
    """A stand-in for a required value that is missing (already reported)."""
    if spec.optional:
        return None
    if spec.type is str:
        return ""
    if spec.is_secret:
        ref = SecretRef(value=Secret(""))
        return ref if spec.type is SecretRef else spec.type.from_ref(ref)
    choices = literal_choices(spec.type)
    if choices:
        return choices[0]
    origin = typing.get_origin(spec.type)
    return origin() if origin in (tuple, frozenset) else spec.type()


def _raw(c: Checks, key: str) -> Any:
    value = c.data.get(key)
    if isinstance(value, str):
        try:
            return interpolate(value, c.walk.env)
        except KeyError as exc:
            c.problem(key, f"environment variable {exc.args[0]} is not set")
            return None
    return value


def _text(c: Checks, key: str) -> Any:
    """A string, or MISSING; numbers are taken as their text; an empty string is no value."""
    value = _raw(c, key)
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        c.problem(key, "must be a string")
        return MISSING
    return str(value) or MISSING


def _field(spec: Spec, c: Checks, when: str) -> Any:
    name, extra, t = spec.name, spec.extra, spec.type
    required = extra.get("required")
    if spec.is_secret:
        value = _secret_ref(c, name)
        if value is MISSING and required:
            c.problem(name, f"required {when} (or {name}_file)")
        if value is MISSING or t is SecretRef:
            return value
        return value.load() if t is Secret else t.from_ref(value)
    if "parse" in extra:
        return _convert(c, name, _raw(c, name), extra["parse"])
    if "variants" in extra:
        return _variant(spec, c)
    if spec.is_struct:
        if spec.optional and not c.present(name):
            return MISSING
        return read(t, c.data.get(name), c.walk, c.where(name))
    origin = typing.get_origin(t)
    if origin is tuple and dataclasses.is_dataclass(typing.get_args(t)[0]):
        return _struct_list(spec, c)
    if origin in (tuple, frozenset):
        if not c.present(name):  # replay_on: "" is no status at all, not the default
            return MISSING
        item = extra.get("item", str)
        items = (_convert(c, name, s, item) for s in _strings(c, name))
        return origin(v for v in items if v is not MISSING)
    if origin is Mapping or origin is dict:
        return _str_map(c, name)
    if t is bool:
        return _convert(c, name, _raw(c, name), _flag)
    if t is int or t is float:
        kind = extra.get("kind")
        parse = parse_size if kind == "size" else parse_duration if kind == "duration" else None
        return _convert(c, name, _raw(c, name), parse or _integer(spec.ge or 0))
    value = _text(c, name)
    if value is MISSING:
        if required:
            c.problem(name, f"required {when if required is True else required}")
        return MISSING
    choices = literal_choices(t)
    if choices and value not in choices:
        c.problem(name, f"must be one of {', '.join(choices)} (got {value!r})")
        return MISSING
    if extra.get("path"):
        c.walk.files.append(value)
        if extra["path"] == "read" and not os.access(value, os.R_OK):
            c.problem(name, f"cannot read {value}")
    return value


def _convert(c: Checks, key: str, value: Any, fn: Any) -> Any:
    if value is None or value is MISSING:
        return MISSING
    try:
        return fn(value)
    except (ValueError, TypeError) as exc:
        c.problem(key, str(exc))
        return MISSING


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError("must be true or false")


def _integer(minimum: int) -> Any:
    def conv(v: Any) -> int:
        try:
            if isinstance(v, bool):
                raise ValueError
            n = int(v)
        except ValueError:
            # Not int()'s own message: it would repeat the value, which may be a misplaced secret.
            raise ValueError("must be a whole number") from None
        if n < minimum:
            raise ValueError(f"must be at least {minimum}")
        return n

    return conv


def _strings(c: Checks, key: str) -> list[str]:
    """A list of strings, or one comma-separated string; each item interpolated."""
    value = _raw(c, key)
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
        c.problem(key, "must be a list of strings")
        return []
    out: list[str] = []
    for v in value:
        try:
            out.append(interpolate(str(v), c.walk.env))
        except KeyError as exc:
            c.problem(key, f"environment variable {exc.args[0]} is not set")
    return out


def _str_map(c: Checks, key: str) -> Any:
    value = _raw(c, key)
    if value is None:
        return MISSING
    if not isinstance(value, dict):
        c.problem(key, "must be a mapping of strings")
        return MISSING
    out: dict[str, str] = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            c.problem(f"{key}.{k}", "must be a string")
            continue
        try:
            out[str(k)] = interpolate(str(v), c.walk.env)
        except KeyError as exc:
            c.problem(f"{key}.{k}", f"environment variable {exc.args[0]} is not set")
    return out


def _secret_ref(c: Checks, key: str) -> Any:
    """``key`` inline or ``key_file``; the file must be readable now."""
    file_key = f"{key}_file"
    inline, path = _text(c, key), _text(c, file_key)
    if inline is not MISSING and path is not MISSING:
        c.problem(key, f"give either {key} or {file_key}, not both")
        return MISSING
    if path is not MISSING:
        c.walk.files.append(path)
        # The path is not repeated in messages: an operator may have put the secret itself
        # where its file's path belongs.
        try:
            if not read_secret_file(path):
                c.problem(file_key, "the file it names is empty")
                return MISSING
        except OSError as exc:
            c.problem(file_key, f"cannot read the file it names ({exc.strerror or 'error'})")
            return MISSING
        except UnicodeDecodeError:
            c.problem(file_key, "the file it names is not UTF-8 text")
            return MISSING
        return SecretRef(path=path)
    if inline is not MISSING:
        return SecretRef(value=Secret(inline))
    return MISSING


def _variant(spec: Spec, c: Checks) -> Any:
    """A tagged union: the ``type`` key (or the first variant) picks the class."""
    variants: dict[str, tuple[type, dict[str, Any]]] = spec.extra["variants"]
    raw = c.data.get(spec.name)
    sub = Checks(c.walk, c.where(spec.name), raw if isinstance(raw, dict) else {})
    choices = tuple(variants)
    tag = _text(sub, "type")
    if tag is not MISSING and tag not in choices:
        sub.problem("type", f"must be one of {', '.join(choices)} (got {tag!r})")
        tag = MISSING
    tag = choices[0] if tag is MISSING else tag
    c.tags[spec.name] = tag
    cls, preset = variants[tag]
    body = {k: v for k, v in raw.items() if k != "type"} if isinstance(raw, dict) else raw
    return read(cls, body, c.walk, sub.path, preset=preset, when=f"when type is {tag}")


def _struct_list(spec: Spec, c: Checks) -> Any:
    cls = typing.get_args(spec.type)[0]
    raw = c.data.get(spec.name)
    if not isinstance(raw, list) or not raw:
        c.problem(spec.name, "must be a non-empty list")
        return MISSING
    return tuple(
        read(cls, item, c.walk, f"{c.where(spec.name)}[{i}]", index=i) for i, item in enumerate(raw)
    )
