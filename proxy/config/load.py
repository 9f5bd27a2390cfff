"""Loading: from a YAML (or JSON) file, from raw data, or from the environment alone.

Only :func:`load` and :func:`from_environment` look at the environment, and they take it as an
argument, so tests pass dicts.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from proxy.egress import ProxyEnvironment
from proxy.errors import ConfigError

from .fields import specs
from .settings import Config
from .upstream import DEFAULT_ROYALTI_URL
from .walk import Walk, read

Path = tuple[str | int, ...]


def build(
    data: object,
    env: Mapping[str, str],
    *,
    source: str,
    proxy_env: Mapping[str, str] | None = None,
) -> Config:
    """Validate raw configuration (already parsed from YAML) into a :class:`Config`.

    ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` are read from ``proxy_env`` (``env`` when not
    given)."""
    walk = Walk(env)
    walk.proxy_env = ProxyEnvironment.from_env(
        env if proxy_env is None else proxy_env, walk.problems
    )
    config = read(Config, data, walk)
    if walk.problems:
        raise ConfigError(walk.problems)
    return dataclasses.replace(
        config,
        source=source,
        watched_files=tuple(dict.fromkeys(walk.files)),
        proxy_env=walk.proxy_env,
    )


def environment_keys(cls: type = Config, path: Path = ()) -> Iterator[tuple[Path, str]]:
    """``(key path, variable)`` for every key the environment-only mode sets: the single
    upstream is ``upstreams[0]``, its auth the first ``type`` (royalti)."""
    for spec in specs(cls):
        here = (*path, spec.name)
        if "variants" in spec.extra:
            first, _ = next(iter(spec.extra["variants"].values()))
            yield from environment_keys(first, here)
        elif spec.is_struct:
            yield from environment_keys(spec.type, here)
        elif typing.get_origin(spec.type) is tuple and dataclasses.is_dataclass(
            typing.get_args(spec.type)[0]
        ):
            yield from environment_keys(typing.get_args(spec.type)[0], (*here, 0))
        else:
            if "env" in spec.extra:
                yield here, spec.extra["env"]
            if "env_file" in spec.extra:
                yield (*path, f"{spec.name}_file"), spec.extra["env_file"]


def from_environment(env: Mapping[str, str]) -> Config:
    """The single-Royalti configuration from ``ROYALTI_*`` variables alone."""
    upstream = {"name": "royalti", "url": DEFAULT_ROYALTI_URL, "path_prefix": "/"}
    data: dict[str, Any] = {"upstreams": [{**upstream, "auth": {"type": "royalti"}}]}
    for path, var in environment_keys():
        if not env.get(var):
            continue
        node: Any = data
        for part in path[:-1]:
            node = node[part] if isinstance(part, int) else node.setdefault(part, {})
        # Values from the environment are literal: no ${...} expansion inside them.
        node[path[-1]] = env[var].replace("$", "$$")
    return build(data, {}, source="environment", proxy_env=env)


def load(path: str | None, env: Mapping[str, str]) -> Config:
    """The configuration from ``path`` (or ``ROYALTI_PROXY_CONFIG``), else from the environment."""
    path = path or env.get("ROYALTI_PROXY_CONFIG") or None
    if path is None:
        return from_environment(env)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    if path.endswith(".json"):
        # A file named *.json is read as JSON (what tools generate); the YAML parser, about
        # 0.8 MiB of the process, is then never loaded.
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError([f"{path}: not valid JSON (line {exc.lineno})"]) from None
        return build(data, env, source=path)
    # Imported here: an environment-only or JSON configuration never loads the YAML parser.
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError([f"{path}: not valid YAML{where}"]) from None
    return build(data, env, source=path)
