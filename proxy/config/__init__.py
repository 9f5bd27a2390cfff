"""Typed, frozen settings, loaded from YAML (or JSON) or from the environment alone.

Declared once (:mod:`.settings`, :mod:`.upstream`, :mod:`.auth`), as dataclasses whose fields carry
a :class:`~.fields.Meta` (description, bounds, environment variable; see :mod:`.fields`). From
those declarations come the loader (:mod:`.walk`, :mod:`.load`), the JSON Schema (:mod:`.schema`,
``royalti-proxy config-schema``, written by msgspec) and docs/configuration.md (:mod:`.docs`).

Loading resolves everything once: ``${VAR}``/``${VAR:-default}`` interpolation, secrets from
``<key>_file``, durations (``30s``, ``5m``, ``6h``), sizes (``1MiB``), defaults. Every problem is
collected with the path of the offending key (``upstreams[0].auth.email: required when type is
royalti``) and reported together in one :class:`~proxy.errors.ConfigError`.
"""

from __future__ import annotations

from .auth import AUTH_TYPES, Auth, AuthType, NoAuth, OAuth2Auth, RoyaltiAuth, StaticAuth
from .load import build, environment_keys, from_environment, load
from .settings import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_LISTEN,
    UVLOOP_MISSING,
    AdminConfig,
    ClientLimits,
    Config,
    EventLoop,
    InboundConfig,
    TokenSettings,
    TokenStoreConfig,
    uvloop_installed,
)
from .upstream import DEFAULT_ROYALTI_URL, Inject, Timeouts, TLSSettings, UpstreamConfig
from .values import (
    Address,
    EncryptionKeys,
    SecretRef,
    interpolate,
    parse_address,
    parse_duration,
    parse_size,
    read_secret_file,
)

__all__ = [
    "AUTH_TYPES",
    "DEFAULT_ADMIN_LISTEN",
    "DEFAULT_LISTEN",
    "DEFAULT_ROYALTI_URL",
    "UVLOOP_MISSING",
    "Address",
    "AdminConfig",
    "Auth",
    "AuthType",
    "ClientLimits",
    "Config",
    "EncryptionKeys",
    "EventLoop",
    "InboundConfig",
    "Inject",
    "NoAuth",
    "OAuth2Auth",
    "RoyaltiAuth",
    "SecretRef",
    "StaticAuth",
    "TLSSettings",
    "Timeouts",
    "TokenSettings",
    "TokenStoreConfig",
    "UpstreamConfig",
    "build",
    "environment_keys",
    "from_environment",
    "interpolate",
    "load",
    "parse_address",
    "parse_duration",
    "parse_size",
    "read_secret_file",
    "uvloop_installed",
]
