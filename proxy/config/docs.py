"""docs/configuration.md's reference: every key with its type, default, environment variable and
meaning, from the same declarations as the loader and the schema.

``python -m proxy.config.docs`` rewrites the block between ``<!-- BEGIN GENERATED: royalti-proxy
config-docs -->`` and ``<!-- END GENERATED -->`` (and nothing else) of docs/configuration.md,
creating the file if it does not exist; ``--check`` only says whether it is up to date (exit 1
if not). The tests run the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .fields import Spec, applies, doc_of, literal_choices, specs
from .schema import file_default
from .settings import Config

BEGIN = "<!-- BEGIN GENERATED: royalti-proxy config-docs -->"
END = "<!-- END GENERATED -->"
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
REGENERATE = "python -m proxy.config.docs"
INTRO = (
    "# Configuration\n\n"
    "The proxy reads one YAML file (`--config PATH` or `ROYALTI_PROXY_CONFIG`), or, without one, "
    "configures a single Royalti upstream from `ROYALTI_*` environment variables; the reference "
    "below lists every key of the file, and the variable that sets it in environment-only mode. "
    "Its JSON Schema is `config/royalti-proxy.schema.json` (`royalti-proxy config-schema`).\n"
)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms" if seconds < 1 else f"{seconds}s"


def _size(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def type_text(spec: Spec) -> str:
    t, extra = spec.type, spec.extra
    if "type_doc" in extra:
        return str(extra["type_doc"])
    if spec.is_secret:
        return "secret"
    if "path" in extra:
        return "path"
    if extra.get("kind") in ("duration", "size"):
        return str(extra["kind"])
    choices = literal_choices(t)
    if choices:
        return " \\| ".join(f"`{c}`" for c in choices)
    origin = typing.get_origin(t)
    if origin in (tuple, frozenset):
        item = "status codes" if typing.get_args(t)[0] is int else "strings"
        return f"list of {item} (or comma-separated)"
    if origin in (Mapping, dict):
        return "mapping of strings"
    if t is int:
        return f"integer ≥ {spec.ge}" if spec.ge else "integer"
    return {bool: "boolean", str: "string"}.get(t, getattr(t, "__name__", str(t)))


def default_text(spec: Spec) -> str:
    if "default_doc" in spec.extra:
        return str(spec.extra["default_doc"])
    value = file_default(spec)
    if value is None or value is dataclasses.MISSING or not spec.has_default:
        return "required" if spec.extra.get("required") else ""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        value = ", ".join(map(str, value))
        return f"`[{value}]`"
    if spec.extra.get("kind") == "duration":
        return f"`{_duration(float(value))}`"
    if spec.extra.get("kind") == "size":
        return f"`{_size(int(value))}`"
    return f"`{value}`" if value != "" else ""


def _rows(
    cls: type, preset: Mapping[str, Any], tag: str | None
) -> Iterator[tuple[str, str, str, str, str]]:
    if tag is not None:
        default = "`royalti`" if tag == "royalti" else "required"
        yield "type", f"`{tag}`", default, "", "Picks this kind of credential."
    for spec in specs(cls):
        if spec.derived or spec.name in preset or not applies(spec, preset):
            continue
        env = spec.extra.get("env", "")
        meaning = spec.description.replace("|", "\\|")
        if "variants" in spec.extra:
            kind = "section, by `type`: " + ", ".join(f"`{t}`" for t in spec.extra["variants"])
            yield spec.name, kind, "required", env, meaning
            continue
        if spec.is_struct or _struct_list(spec):
            many = _struct_list(spec) is not None
            default = "required" if spec.extra.get("required") else ""
            yield spec.name, "list of sections" if many else "section", default, env, meaning
            continue
        yield spec.name, type_text(spec), default_text(spec), env, meaning
        if spec.is_secret:
            file_env = spec.extra.get("env_file", "")
            yield f"{spec.name}_file", "path", "", file_env, f"A file holding {spec.name}."


def _struct_list(spec: Spec) -> type | None:
    if typing.get_origin(spec.type) is tuple:
        item = typing.get_args(spec.type)[0]
        if dataclasses.is_dataclass(item):
            return typing.cast(type, item)
    return None


def _sections(
    cls: type, path: str, preset: Mapping[str, Any] = {}, tag: str | None = None
) -> Iterator[tuple[str, type, Mapping[str, Any], str | None]]:
    yield path, cls, preset, tag
    for spec in specs(cls):
        if spec.derived or not applies(spec, preset):
            continue
        here = f"{path}.{spec.name}" if path else spec.name
        if "variants" in spec.extra:
            for tag, (sub, sub_preset) in spec.extra["variants"].items():
                yield from _sections(sub, here, sub_preset, tag)
        elif spec.is_struct:
            yield from _sections(spec.type, here)
        elif (item := _struct_list(spec)) is not None:
            yield from _sections(item, f"{here}[]")


def reference() -> str:
    """The generated block, without its markers."""
    out = [
        f"Generated from the settings classes in `proxy/config/` by `{REGENERATE}`; edit "
        "those, not this block. *Environment* is the variable that sets the key when the proxy "
        "runs without a file. Durations are seconds or `250ms`, `30s`, `5m`, `6h`, `1d`; sizes "
        "bytes or `512KiB`, `1MiB`, `10MB`; a secret is given inline (normally as `${VAR}`) or "
        "as `<key>_file`, never both; a text key left empty (`${VAR:-}` with `VAR` unset) "
        "counts as not given.",
    ]
    for path, cls, preset, tag in _sections(Config, ""):
        rows = list(_rows(cls, preset, tag))
        if not rows:
            continue
        heading = f"`{path}`" if path else "Top level"
        if tag is not None:
            heading += f" (`type: {tag}`)"
        doc = doc_of(cls)
        out += ["", f"### {heading}", ""]
        if path and doc:
            out += [doc, ""]
        out += ["| key | type | default | environment | meaning |", "|---|---|---|---|---|"]
        for key, kind, default, env, meaning in rows:
            env_text = f"`{env}`" if env else ""
            out.append(f"| `{key}` | {kind} | {default} | {env_text} | {meaning} |")
    return "\n".join(out) + "\n"


def updated(text: str | None) -> str:
    """``text`` (docs/configuration.md, or None when it does not exist) with its block
    regenerated and everything outside the markers kept."""
    block = f"{BEGIN}\n\n{reference()}\n{END}"
    if text is None:
        return f"{INTRO}\n## Reference\n\n{block}\n"
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN} ... {END} block")
    return text[:start] + block + text[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=REGENERATE, description=__doc__.splitlines()[0])
    p.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    p.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = p.parse_args(argv)
    path: Path = args.path
    current = path.read_text(encoding="utf-8") if path.exists() else None
    fresh = updated(current)
    if args.check:
        if fresh != current:
            print(f"{path} is out of date: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    if fresh != current:
        path.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
