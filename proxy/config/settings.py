"""The whole configuration (:class:`Config`) and its sections besides the upstreams."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Annotated, Literal

from proxy.egress import ProxyEnvironment

from .fields import DURATION, SIZE, key
from .upstream import UpstreamConfig
from .values import (
    Address,
    EncryptionKeys,
    IPNetwork,
    SecretRef,
    fernet_keys,
    parse_file_mode,
    parse_network,
    to_address,
)
from .walk import Checks

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9090"

EventLoop = Literal["asyncio", "uvloop"]

#: Why ``uvloop`` cannot be the event loop, and what to do about it.
UVLOOP_MISSING = "uvloop is not installed: pip install 'royalti-auth-proxy[fast]' (or use asyncio)"


def uvloop_installed() -> bool:
    """Whether uvloop can be imported, found without importing it (2.4 MiB of an idle process,
    which only ``event_loop: uvloop`` pays)."""
    return importlib.util.find_spec("uvloop") is not None


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """The token cache, shared by all upstreams."""

    idle_timeout: Annotated[
        float,
        DURATION,
        key(
            "A workspace's token not used for this long is no longer renewed and is dropped "
            "(default workspaces are always kept)."
        ),
    ] = 3600.0
    max_entries: Annotated[
        int,
        key(
            "At most this many tokens (workspaces) are cached per upstream; the least recently "
            "used go.",
            ge=1,
        ),
    ] = 1000
    min_backoff: Annotated[
        float, DURATION, key("The shortest retry delay after a failed token fetch.")
    ] = 1.0
    max_backoff: Annotated[
        float,
        DURATION,
        key(
            "The longest (exponential with jitter, never shorter than the endpoint's Retry-After)."
        ),
    ] = 300.0

    def _check(self, c: Checks) -> TokenSettings:
        if self.min_backoff > self.max_backoff:
            c.problem("min_backoff", "must not exceed max_backoff")
        return self


@dataclass(frozen=True, slots=True)
class InboundConfig:
    """Who may call the proxy listener. On a non-loopback address the proxy refuses to start
    unless allowed_cidrs, shared_secret(_file) or a unix: socket guards it, or
    allow_unauthenticated is true."""

    allowed_cidrs: Annotated[
        tuple[IPNetwork, ...],
        key(
            "Client addresses allowed to connect (others get 403 CLIENT_NOT_ALLOWED): a list, "
            "or one comma-separated string.",
            item=parse_network,
            env="ROYALTI_PROXY_ALLOWED_CIDRS",
        ),
    ] = ()
    shared_secret: Annotated[
        SecretRef | None,
        key(
            "A secret every request must carry in shared_secret_header, compared in constant "
            "time and removed before forwarding (others get 401 CLIENT_UNAUTHENTICATED).",
            env_file="ROYALTI_PROXY_SHARED_SECRET_FILE",
        ),
    ] = None
    shared_secret_header: Annotated[
        str,
        key("The header that carries shared_secret.", env="ROYALTI_PROXY_SHARED_SECRET_HEADER"),
    ] = "X-Proxy-Secret"
    allow_unauthenticated: Annotated[
        bool,
        key(
            "Listen on a non-loopback address without a guard (logged loudly).",
            env="ROYALTI_PROXY_ALLOW_UNAUTHENTICATED",
        ),
    ] = False
    unix_socket_mode: Annotated[
        int,
        key(
            "File mode of the socket when listen is unix:/path (octal).",
            parse=parse_file_mode,
            type_doc="octal file mode",
            schema_default="0660",
        ),
    ] = 0o660


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """What one client connection may ask of the proxy listener."""

    max_header_size: Annotated[
        int, SIZE, key("Bytes per request line and per header field (larger: 400).")
    ] = 8190
    max_headers: Annotated[int, key("Header fields per request (more: 400).", ge=1)] = 100
    idle_timeout: Annotated[
        float, DURATION, key("A keep-alive connection with no request is closed after this.")
    ] = 75.0
    header_timeout: Annotated[
        float, DURATION, key("A new connection must have sent its first request's headers by then.")
    ] = 15.0

    def _check(self, c: Checks) -> ClientLimits:
        for name in ("idle_timeout", "header_timeout", "max_header_size"):
            if getattr(self, name) <= 0:
                c.problem(name, "must be positive")
        return self


@dataclass(frozen=True, slots=True)
class TokenStoreConfig:
    """Where tokens are kept: this process's memory, or Redis shared by every replica."""

    type: Annotated[
        Literal["memory", "redis"],
        key("memory: this process only. redis: shared by every replica, values encrypted."),
    ] = "memory"
    url: Annotated[
        str | None,
        key("redis:// or rediss:// (TLS), with user and password as Redis ACLs want them."),
    ] = None
    key_prefix: Annotated[str, key("Prefix of every Redis key.")] = "royalti-proxy"
    encryption_key: Annotated[
        EncryptionKeys | None,
        key(
            "Fernet keys (whitespace- or comma-separated): the first encrypts, all decrypt. "
            "Required with redis."
        ),
    ] = None
    timeout: Annotated[
        float,
        DURATION,
        key("A request never waits on Redis longer than this; past it the local cache serves."),
    ] = 0.25
    lease: Annotated[
        float, DURATION, key("A renewal lock's lease, extended while the renewal runs.")
    ] = 15.0
    ca_file: Annotated[
        str | None, key("The CA (PEM) of a rediss:// server with a private CA.", path="watch")
    ] = None

    def _check(self, c: Checks) -> TokenStoreConfig:
        store = self
        if self.type == "redis":
            if not self.url:
                c.problem("url", "required when type is redis")
            elif not self.url.startswith(("redis://", "rediss://", "unix://")):
                c.problem("url", "must be a redis://, rediss:// or unix:// URL")
            ref = self.encryption_key.source if self.encryption_key is not None else None
            if ref is None:
                c.problem(
                    "encryption_key_file", "required when type is redis (tokens are encrypted)"
                )
            else:
                try:
                    text = ref.load().reveal()
                except (OSError, UnicodeDecodeError):
                    pass  # an unreadable key file is reported already
                else:
                    try:
                        keys = EncryptionKeys(ref, fernet_keys(text))
                        store = dataclasses.replace(self, encryption_key=keys)
                    except ValueError as exc:
                        c.problem("encryption_key", str(exc))
        if self.timeout <= 0 or self.lease <= 0:
            c.problem("timeout" if self.timeout <= 0 else "lease", "must be positive")
        return store


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin listener: health, readiness, metrics and token status. Never expose it."""

    listen: Annotated[
        Address,
        key(
            "host:port, [ipv6]:port, :port or unix:/path.",
            parse=to_address,
            type_doc="address",
            env="ROYALTI_PROXY_ADMIN_LISTEN",
        ),
    ] = field(default_factory=lambda: Address(port=9090))
    enable_quit: Annotated[
        bool,
        key(
            "Allow an HTTP request to stop the proxy (for sidecars of Jobs that must exit with "
            "their main container)."
        ),
    ] = False
    metrics_max_workspaces: Annotated[
        int,
        key(
            "Workspaces named in metric labels per upstream; the rest are folded into other.",
            ge=1,
        ),
    ] = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The configuration file."""

    listen: Annotated[
        Address,
        key(
            "Where clients connect: host:port, [ipv6]:port, :port (all interfaces) or "
            "unix:/path/to.sock. Keep it on loopback (or a Unix socket) in a sidecar.",
            parse=to_address,
            type_doc="address",
            env="ROYALTI_PROXY_LISTEN",
        ),
    ] = field(default_factory=Address)
    admin: Annotated[AdminConfig, key("The admin listener.")] = AdminConfig()
    inbound: Annotated[InboundConfig, key("Who may call the proxy listener.")] = InboundConfig()
    limits: Annotated[ClientLimits, key("Limits per client connection.")] = ClientLimits()
    tokens: Annotated[TokenSettings, key("The token cache.")] = TokenSettings()
    token_store: Annotated[TokenStoreConfig, key("Where tokens live.")] = TokenStoreConfig()
    upstreams: Annotated[
        tuple[UpstreamConfig, ...], key("Where requests go, by path prefix.", required=True)
    ]
    shutdown_timeout: Annotated[
        float, DURATION, key("On SIGTERM, in-flight requests get this long to finish.")
    ] = 25.0
    log_format: Annotated[Literal["json", "text"], key("json (one object per line) or text.")] = (
        "json"
    )
    log_level: Annotated[str, key("debug, info, warning or error.")] = "INFO"
    access_log: Annotated[bool, key("One log line per proxied request.")] = False
    event_loop: Annotated[
        EventLoop,
        key(
            "asyncio: the standard library's loop. uvloop: 4-13 % more throughput for about "
            "2.4 MiB more memory; needs the fast extra (pip install "
            "'royalti-auth-proxy[fast]'). A change needs a restart.",
            env="ROYALTI_PROXY_EVENT_LOOP",
        ),
    ] = "asyncio"
    reload_poll: Annotated[
        float,
        DURATION,
        key(
            "How often this file and every secret/TLS file it names are checked for changes; a "
            "change reloads the configuration without a restart."
        ),
    ] = 2.0
    source: Annotated[
        str, key("Where the configuration came from: a file path, or environment.", derived=True)
    ] = "defaults"
    watched_files: Annotated[
        tuple[str, ...],
        key(
            "The secret and TLS files the configuration names; a change to one triggers a reload.",
            derived=True,
        ),
    ] = ()
    proxy_env: Annotated[
        ProxyEnvironment,
        key("HTTPS_PROXY, HTTP_PROXY and NO_PROXY, as read at load.", derived=True),
    ] = field(default_factory=ProxyEnvironment)

    def _check(self, c: Checks) -> Config:
        guarded = self.inbound.allowed_cidrs or self.inbound.shared_secret is not None
        if not self.listen.is_loopback and not guarded and not self.inbound.allow_unauthenticated:
            c.problem(
                "listen",
                f"{self.listen} is not a loopback address: anyone who reaches it could use this "
                "proxy's credentials. Set inbound.allowed_cidrs and/or inbound.shared_secret_file, "
                "listen on a unix: socket, or set inbound.allow_unauthenticated: true",
            )
        names = [u.name for u in self.upstreams]
        prefixes = [u.path_prefix.rstrip("/") for u in self.upstreams]
        for i, u in enumerate(self.upstreams):
            if names.index(u.name) != i:
                c.problem(f"upstreams[{i}].name", f"duplicate name {u.name!r}")
        for i, u in enumerate(self.upstreams):
            if prefixes.index(prefixes[i]) != i:
                c.problem(f"upstreams[{i}].path_prefix", f"duplicate prefix {u.path_prefix!r}")
        level = self.log_level.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            c.problem("log_level", "must be one of debug, info, warning, error")
        if self.event_loop == "uvloop" and not uvloop_installed():
            c.problem("event_loop", UVLOOP_MISSING)
        return dataclasses.replace(self, log_level=level)
