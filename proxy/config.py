"""Typed, frozen settings, loaded from YAML or from the environment alone.

Loading resolves everything once: ``${VAR}``/``${VAR:-default}`` interpolation, secrets from
``<key>_file``, durations (``30s``, ``5m``, ``6h``), sizes (``1MiB``), defaults. Every problem is
collected with the path of the offending key (``upstreams[0].auth.email: required when type is
royalti``) and reported together in one :class:`~proxy.errors.ConfigError`.

Only :func:`load` and :func:`from_environment` look at the environment, and they take it as an
argument, so tests pass dicts.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

from proxy.egress import Egress, ProxyEnvironment, ProxySetting, ProxyURL, parse_proxy_url, resolve
from proxy.errors import ConfigError
from proxy.secret import Secret

AuthType = Literal["royalti", "oauth2_password", "oauth2_client_credentials", "static", "none"]
AUTH_TYPES: tuple[AuthType, ...] = (
    "royalti",
    "oauth2_password",
    "oauth2_client_credentials",
    "static",
    "none",
)
DEFAULT_ROYALTI_URL = "https://api.royalti.io"
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9090"

T = TypeVar("T")


# -- the settings -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """Where to listen: a host and port, or a Unix socket path."""

    host: str = "127.0.0.1"
    port: int = 8080
    unix: str | None = None

    @property
    def is_loopback(self) -> bool:
        if self.unix is not None:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SecretRef:
    """A secret given inline or as a file. ``load()`` reads the file again each call, so a
    credential that an operator rotates on disk is picked up."""

    value: Secret | None = None
    path: str | None = None

    def load(self) -> Secret:
        if self.value is not None:
            return self.value
        assert self.path is not None
        return read_secret_file(self.path)


@dataclass(frozen=True, slots=True)
class RoyaltiAuth:
    email: str | None = None
    password: Secret | None = None
    refresh_token: SecretRef | None = None
    api_key: SecretRef | None = None
    default_workspace: str | None = None
    allowed_workspaces: frozenset[str] = frozenset()
    workspace_header: str = "X-Royalti-Workspace"
    user_id: str | None = None
    auth_url: str | None = None
    """Where ``/auth/login`` and ``/auth/authtoken`` live, when not under the upstream's url."""

    @property
    def mode(self) -> Literal["login", "refresh_token", "api_key"]:
        if self.api_key is not None:
            return "api_key"
        if self.email is not None:
            return "login"
        return "refresh_token"


@dataclass(frozen=True, slots=True)
class OAuth2Auth:
    grant: Literal["password", "client_credentials"]
    token_url: str
    client_id: str | None = None
    client_secret: Secret | None = None
    client_auth: Literal["basic", "post", "none"] = "basic"
    username: str | None = None
    password: Secret | None = None
    scope: str | None = None
    extra_params: Mapping[str, str] = field(default_factory=dict)
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    default_lifetime: float = 3600.0


@dataclass(frozen=True, slots=True)
class StaticAuth:
    token: SecretRef


@dataclass(frozen=True, slots=True)
class NoAuth:
    pass


Auth = RoyaltiAuth | OAuth2Auth | StaticAuth | NoAuth


@dataclass(frozen=True, slots=True)
class TLSSettings:
    verify: bool = True
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class Inject:
    header: str = "Authorization"
    format: str = "Bearer {token}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0
    read: float = 300.0
    token: float = 10.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    url: str
    auth: Auth
    auth_type: AuthType
    path_prefix: str = "/"
    timeouts: Timeouts = Timeouts()
    replay_on: frozenset[int] = frozenset({401})
    replay_max_body: int = 1024 * 1024
    max_connections: int = 100
    keepalive_timeout: float = 4.0
    """Seconds an idle pooled connection to the upstream is kept for reuse; to be set below
    the upstream's own idle timeout (why: in :func:`_upstream`)."""
    max_concurrent: int = 1000
    """Requests handled at once for this upstream; beyond it, 503 OVERLOADED."""
    max_body_size: int | None = None
    """Largest request body accepted, in bytes; beyond it, 413 BODY_TOO_LARGE."""
    tls: TLSSettings = TLSSettings()
    inject: Inject = Inject()
    egress: ProxySetting = field(default_factory=ProxySetting)
    """The upstream's own ``egress`` section (overrides the environment)."""
    token_egress: ProxySetting | None = None
    """``token_egress``, for token endpoints reached another way; None: as ``egress``."""
    proxy: Egress | None = None
    """The egress proxy forwarded requests and WebSocket handshakes go through (resolved at
    load from ``egress`` and the environment); None: direct."""
    token_proxy: Egress | None = None
    """The egress proxy the token endpoint (login, authtoken, OAuth2 token) is reached
    through; None: direct."""


@dataclass(frozen=True, slots=True)
class TokenSettings:
    idle_timeout: float = 3600.0
    max_entries: int = 1000
    min_backoff: float = 1.0
    max_backoff: float = 300.0


@dataclass(frozen=True, slots=True)
class InboundConfig:
    """Who may call the proxy listener."""

    allowed_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    shared_secret: SecretRef | None = None
    shared_secret_header: str = "X-Proxy-Secret"
    allow_unauthenticated: bool = False
    unix_socket_mode: int = 0o660


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """What one client connection may ask of the proxy listener."""

    max_header_size: int = 8190
    max_headers: int = 100
    idle_timeout: float = 75.0
    header_timeout: float = 15.0


@dataclass(frozen=True, slots=True)
class EncryptionKeys:
    """``token_store.encryption_key``: one or more Fernet keys (32 url-safe base64-encoded bytes
    each), separated by whitespace or commas. The first encrypts, all of them decrypt, so keys
    can be rotated without a flag day.

    Two are equal when given the same way (the same inline text or the same file), as before
    they were parsed: the keys read from the file are not compared.
    """

    source: SecretRef
    keys: tuple[Secret, ...] = field(compare=False)


@dataclass(frozen=True, slots=True)
class TokenStoreConfig:
    """Where tokens are kept: this process's memory, or Redis shared by every replica."""

    type: Literal["memory", "redis"] = "memory"
    url: str | None = None
    """``redis://`` or ``rediss://`` (TLS), with user and password as Redis ACLs want them."""
    key_prefix: str = "royalti-proxy"
    encryption_key: EncryptionKeys | None = None
    """The Fernet keys that encrypt every value written, parsed and checked at load."""
    timeout: float = 0.25
    """A request never waits on Redis longer than this; past it the local cache serves."""
    lease: float = 15.0
    """How long a renewal lock is held before it must be extended."""
    ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Address = Address(port=9090)
    enable_quit: bool = False
    metrics_max_workspaces: int = 20
    """Workspaces named in metric labels per upstream; the rest are folded into ``other``."""


@dataclass(frozen=True, slots=True)
class Config:
    upstreams: tuple[UpstreamConfig, ...]
    listen: Address = Address()
    admin: AdminConfig = AdminConfig()
    inbound: InboundConfig = InboundConfig()
    limits: ClientLimits = ClientLimits()
    tokens: TokenSettings = TokenSettings()
    token_store: TokenStoreConfig = TokenStoreConfig()
    shutdown_timeout: float = 25.0
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"
    access_log: bool = False
    reload_poll: float = 2.0
    """How often the configuration file and every secret file are checked for changes."""
    source: str = "defaults"
    """Where the configuration came from: a file path, or ``environment``."""
    watched_files: tuple[str, ...] = ()
    """The secret and TLS files the configuration names; a change to one triggers a reload."""
    proxy_env: ProxyEnvironment = field(default_factory=ProxyEnvironment)
    """``HTTPS_PROXY``, ``HTTP_PROXY`` and ``NO_PROXY``, as read when the configuration was
    loaded."""


# -- parsing helpers --------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
    None: 1,
}
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``1.5``, ``"30s"``, ``"5m"``, ``"6h"``, ``"250ms"``, ``"1d"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, 30s, 5m or 6h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError("expected a duration such as 30, 30s, 5m or 6h")


def parse_size(value: object) -> int:
    """Bytes from ``1048576``, ``"512KiB"``, ``"1MiB"``, ``"10MB"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576 or 1MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            return int(m.group(1)) * _SIZE_UNITS[unit]
    raise ValueError("expected a size such as 1048576 or 1MiB")


def parse_address(value: str) -> Address:
    """``host:port``, ``[v6]:port``, ``:port`` (all interfaces) or ``unix:/path``."""
    if value.startswith("unix:"):
        path = value[5:]
        if not path:
            raise ValueError("unix: needs a socket path")
        return Address(unix=path)
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit():
        raise ValueError("expected host:port, [ipv6]:port or unix:/path")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError("port out of range")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - an explicit ":port" asks for it
    return Address(host=host, port=port)


def read_secret_file(path: str) -> Secret:
    """A secret from a file, without its trailing newline. Raises OSError if unreadable."""
    with open(path, encoding="utf-8") as fh:
        return Secret(fh.read().rstrip("\r\n"))


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; ``$$`` is a literal ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        raise KeyError(name)

    return _VAR.sub(sub, text)


class _Reader:
    """Typed access to one mapping of the raw configuration; problems are collected, not raised."""

    def __init__(
        self,
        data: object,
        path: str,
        problems: list[str],
        env: Mapping[str, str],
        files: list[str] | None = None,
    ):
        self.path = path
        self.problems = problems
        self.env = env
        self.files: list[str] = [] if files is None else files
        """Every secret and TLS file the configuration names (watched for changes)."""
        self.seen: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.problem(None, "must be a mapping")
            data = {}
        self.data: dict[str, Any] = data

    def where(self, key: str | None) -> str:
        if key is None:
            return self.path or "(top level)"
        return f"{self.path}.{key}" if self.path else key

    def problem(self, key: str | None, reason: str) -> None:
        self.problems.append(f"{self.where(key)}: {reason}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        value = self.data.get(key)
        if isinstance(value, str):
            try:
                return interpolate(value, self.env)
            except KeyError as exc:
                self.problem(key, f"environment variable {exc.args[0]} is not set")
                return None
        return value

    def convert(self, key: str, default: T, fn: Callable[[Any], T]) -> T:
        value = self.raw(key)
        if value is None:
            return default
        try:
            return fn(value)
        except (ValueError, TypeError) as exc:
            self.problem(key, str(exc))
            return default

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.problem(key, "must be a string")
            return default
        return str(value)

    def req_str(self, key: str, when: str) -> str:
        value = self.text(key)
        if not value:
            self.problem(key, f"required {when}")
            return ""
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        self.problem(key, "must be true or false")
        return default

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        def conv(v: Any) -> int:
            if isinstance(v, bool):
                raise ValueError("must be a whole number")
            n = int(v)
            if n < minimum:
                raise ValueError(f"must be at least {minimum}")
            return n

        return self.convert(key, default, conv)

    def duration(self, key: str, default: float) -> float:
        return self.convert(key, default, parse_duration)

    def size(self, key: str, default: int) -> int:
        return self.convert(key, default, parse_size)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(key, default) or default
        if value not in choices:
            self.problem(key, f"must be one of {', '.join(choices)} (got {value!r})")
            return default
        return value

    def str_list(self, key: str) -> list[str]:
        value = self.raw(key)
        if value is None:
            return []
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
            self.problem(key, "must be a list of strings")
            return []
        out: list[str] = []
        for v in value:
            try:
                out.append(interpolate(str(v), self.env))
            except KeyError as exc:
                self.problem(key, f"environment variable {exc.args[0]} is not set")
        return out

    def str_map(self, key: str) -> dict[str, str]:
        value = self.raw(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(key, "must be a mapping of strings")
            return {}
        out: dict[str, str] = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                self.problem(f"{key}.{k}", "must be a string")
                continue
            try:
                out[str(k)] = interpolate(str(v), self.env)
            except KeyError as exc:
                self.problem(f"{key}.{k}", f"environment variable {exc.args[0]} is not set")
        return out

    def child(self, key: str) -> _Reader:
        self.seen.add(key)
        return _Reader(self.data.get(key), self.where(key), self.problems, self.env, self.files)

    def secret_ref(self, key: str) -> SecretRef | None:
        """``key`` inline or ``key_file``; the file must be readable now."""
        file_key = f"{key}_file"
        inline, path = self.text(key), self.text(file_key)
        if inline and path:
            self.problem(key, f"give either {key} or {file_key}, not both")
            return None
        if path:
            self.files.append(path)
            # The path is not repeated in messages: an operator may have put the secret itself
            # where its file's path belongs.
            try:
                if not read_secret_file(path):
                    self.problem(file_key, "the file it names is empty")
                    return None
            except OSError as exc:
                self.problem(file_key, f"cannot read the file it names ({exc.strerror or 'error'})")
                return None
            except UnicodeDecodeError:
                self.problem(file_key, "the file it names is not UTF-8 text")
                return None
            return SecretRef(path=path)
        if inline:
            return SecretRef(value=Secret(inline))
        return None

    def secret(self, key: str) -> Secret | None:
        ref = self.secret_ref(key)
        if ref is None:
            return None
        try:
            return ref.load()
        except OSError:  # pragma: no cover - checked readable just above
            return None

    def done(self) -> None:
        for key in self.data:
            if key not in self.seen:
                self.problem(str(key), "unknown key")


# -- building ---------------------------------------------------------------------------------


def _auth(r: _Reader) -> tuple[Auth, AuthType]:
    auth_type = cast(AuthType, r.choice("type", "royalti", AUTH_TYPES))
    when = f"when type is {auth_type}"
    auth: Auth
    if auth_type == "royalti":
        email = r.text("email")
        password = r.secret("password")
        refresh = r.secret_ref("refresh_token")
        api_key = r.secret_ref("api_key")
        modes = [
            m
            for m, on in (("email", email), ("refresh_token", refresh), ("api_key", api_key))
            if on
        ]
        if not modes:
            r.problem("email", f"required {when} (or refresh_token or api_key)")
        elif len(modes) > 1:
            r.problem(
                None,
                f"give one of email+password, refresh_token or api_key, not {' and '.join(modes)}",
            )
        # An unreadable password_file has been reported already; an empty one (an unset
        # ${VAR:-}) is no password at all.
        if email and password is None and not r.text("password_file"):
            r.problem("password", "required with email (or password_file)")
        if password is not None and not email:
            r.problem("email", "required with password")
        header = r.text("workspace_header", "X-Royalti-Workspace") or "X-Royalti-Workspace"
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", header):
            r.problem("workspace_header", "is not a valid header name")
        auth = RoyaltiAuth(
            email=email,
            password=password,
            refresh_token=refresh,
            api_key=api_key,
            default_workspace=r.text("default_workspace") or None,
            allowed_workspaces=frozenset(r.str_list("allowed_workspaces")),
            workspace_header=header,
            user_id=r.text("user_id") or None,
            auth_url=(r.text("auth_url") or "").rstrip("/") or None,
        )
        if auth.auth_url and not re.match(r"^https?://[^/?#]+", auth.auth_url):
            r.problem("auth_url", "must be an http:// or https:// URL")
        if (
            auth.default_workspace
            and auth.allowed_workspaces
            and auth.default_workspace not in auth.allowed_workspaces
        ):
            r.problem("default_workspace", "is not in allowed_workspaces")
    elif auth_type in ("oauth2_password", "oauth2_client_credentials"):
        grant: Literal["password", "client_credentials"] = (
            "password" if auth_type == "oauth2_password" else "client_credentials"
        )
        token_url = r.req_str("token_url", when)
        client_id = r.text("client_id")
        client_secret = r.secret("client_secret")
        # Without a client secret there is nothing to authenticate the client with.
        default_auth = "basic" if client_secret is not None else "none"
        client_auth = r.choice("client_auth", default_auth, ("basic", "post", "none"))
        username = r.text("username") if grant == "password" else None
        password = r.secret("password") if grant == "password" else None
        auth = OAuth2Auth(
            grant=grant,
            token_url=token_url,
            client_id=client_id,
            client_secret=client_secret,
            client_auth=cast(Literal["basic", "post", "none"], client_auth),
            username=username,
            password=password,
            scope=r.text("scope"),
            extra_params=r.str_map("extra_params"),
            extra_headers=r.str_map("extra_headers"),
            default_lifetime=r.duration("default_lifetime", 3600.0),
        )
        if token_url:
            r.problems.extend(f"{r.where(None)}.{line}" for line in _oauth2_problems(auth))
    elif auth_type == "static":
        token = r.secret_ref("token")
        if token is None:
            r.problem("token", f"required {when} (or token_file)")
            token = SecretRef(value=Secret(""))
        auth = StaticAuth(token=token)
    else:
        auth = NoAuth()
    r.done()
    return auth, auth_type


# Form fields and headers the OAuth2 source writes itself (proxy.tokens.sources.oauth2), or that
# aiohttp owns: extra_params and extra_headers may not override them.
_OAUTH2_RESERVED_PARAMS = frozenset(
    {"grant_type", "username", "password", "refresh_token", "client_id", "client_secret", "scope"}
)
_OAUTH2_RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "host", "transfer-encoding"}
)


def _oauth2_problems(auth: OAuth2Auth) -> list[str]:
    """What makes these OAuth2 settings unable to work, one line per problem, each starting with
    its key below ``auth``. Checked here only: the source trusts the settings it is given."""
    problems: list[str] = []
    url = urlsplit(auth.token_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        problems.append("token_url: must be an absolute http or https URL")
    client_auth = auth.client_auth
    if client_auth in ("basic", "post") and not (auth.client_id and auth.client_secret):
        problems.append(f"client_auth: {client_auth!r} needs client_id and client_secret")
    if client_auth == "none" and auth.client_secret:
        problems.append("client_secret: set, but client_auth is 'none'")
    if auth.grant == "password" and not (auth.username and auth.password):
        problems.append("username, password: the password grant needs both")
    # RFC 6749 §4.4: only a confidential client may use the client-credentials grant.
    if auth.grant == "client_credentials" and client_auth == "none":
        problems.append("client_auth: the client_credentials grant needs 'basic' or 'post'")
    for name in sorted(_OAUTH2_RESERVED_PARAMS.intersection(auth.extra_params)):
        problems.append(f"extra_params.{name}: set by the source itself")
    for name in sorted(auth.extra_headers):
        lower = name.lower()
        if lower in _OAUTH2_RESERVED_HEADERS or (
            lower == "authorization" and client_auth == "basic"
        ):
            problems.append(f"extra_headers.{name}: set by the source itself")
    if not auth.default_lifetime > 0:
        problems.append("default_lifetime: must be positive")
    return problems


def _fernet_keys(text: str, *, where: str, problems: list[str]) -> tuple[Secret, ...]:
    """The Fernet keys in ``text``; a line in ``problems`` naming ``where`` when unusable."""
    # Imported here: only a redis token store encrypts, and only it needs cryptography.
    from cryptography.fernet import Fernet

    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if not parts:
        problems.append(f"{where}: is empty")
        return ()
    for i, part in enumerate(parts):
        try:
            Fernet(part.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            # Never the key itself in the message: only which one is wrong.
            problems.append(
                f"{where}: key {i + 1} is not a Fernet key (32 url-safe base64-encoded "
                "bytes; make one with `python -c 'from cryptography.fernet import "
                "Fernet; print(Fernet.generate_key().decode())'`)"
            )
            return ()
    return tuple(Secret(p) for p in parts)


def _token_store(r: _Reader) -> TokenStoreConfig:
    kind = r.choice("type", "memory", ("memory", "redis"))
    url = r.text("url")
    key_prefix = r.text("key_prefix", "royalti-proxy") or "royalti-proxy"
    ref = r.secret_ref("encryption_key")
    store = TokenStoreConfig(
        type=cast(Literal["memory", "redis"], kind),
        url=url,
        key_prefix=key_prefix,
        # Parsed below, for redis only (memory has no use for it); the reference alone
        # still tells a changed key from an unchanged one on reload.
        encryption_key=EncryptionKeys(ref, ()) if ref is not None else None,
        timeout=r.duration("timeout", 0.25),
        lease=r.duration("lease", 15.0),
        ca_file=r.text("ca_file"),
    )
    if kind == "redis":
        if not store.url:
            r.problem("url", "required when type is redis")
        elif not store.url.startswith(("redis://", "rediss://", "unix://")):
            r.problem("url", "must be a redis://, rediss:// or unix:// URL")
        if ref is None:
            r.problem("encryption_key_file", "required when type is redis (tokens are encrypted)")
        else:
            try:
                text = ref.load().reveal()
            except (OSError, UnicodeDecodeError):
                pass  # an unreadable key file is reported by secret_ref already
            else:
                keys = _fernet_keys(text, where=r.where("encryption_key"), problems=r.problems)
                store = dataclasses.replace(store, encryption_key=EncryptionKeys(ref, keys))
    if store.timeout <= 0 or store.lease <= 0:
        r.problem("timeout" if store.timeout <= 0 else "lease", "must be positive")
    if store.ca_file:
        r.files.append(store.ca_file)
    r.done()
    return store


def _inbound(r: _Reader, listen: Address) -> InboundConfig:
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for cidr in r.str_list("allowed_cidrs"):
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            r.problem("allowed_cidrs", f"{cidr!r} is not an address or network")
    mode_text = r.text("unix_socket_mode", "0660") or "0660"
    try:
        mode = int(mode_text, 8)
        if not 0 <= mode <= 0o777:
            raise ValueError
    except ValueError:
        r.problem("unix_socket_mode", "must be an octal file mode such as 0660")
        mode = 0o660
    header = r.text("shared_secret_header", "X-Proxy-Secret") or "X-Proxy-Secret"
    inbound = InboundConfig(
        allowed_cidrs=tuple(networks),
        shared_secret=r.secret_ref("shared_secret"),
        shared_secret_header=header,
        allow_unauthenticated=r.flag("allow_unauthenticated", False),
        unix_socket_mode=mode,
    )
    guarded = inbound.allowed_cidrs or inbound.shared_secret is not None
    if not listen.is_loopback and not guarded and not inbound.allow_unauthenticated:
        r.problems.append(
            f"listen: {listen} is not a loopback address: anyone who reaches it could use this "
            "proxy's credentials. Set inbound.allowed_cidrs and/or inbound.shared_secret_file, "
            "listen on a unix: socket, or set inbound.allow_unauthenticated: true"
        )
    r.done()
    return inbound


def _tls(r: _Reader) -> TLSSettings:
    tls = TLSSettings(
        verify=r.flag("verify", True),
        ca_file=r.text("ca_file"),
        cert_file=r.text("cert_file"),
        key_file=r.text("key_file"),
    )
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, key)
        if path:
            r.files.append(path)
        if path and not os.access(path, os.R_OK):
            r.problem(key, f"cannot read {path}")
    if tls.key_file and not tls.cert_file:
        r.problem("cert_file", "required with key_file")
    r.done()
    return tls


def _egress(r: _Reader) -> ProxySetting:
    """An ``egress`` (or ``token_egress``) section: ``proxy``, ``username``, ``password`` or
    ``password_file``, ``ca_file``."""
    proxy: ProxyURL | Literal["none"] | None = None
    text = r.text("proxy")
    if text is not None and text.strip().lower() == "none":
        proxy = "none"
    elif text:
        try:
            proxy = parse_proxy_url(text)
        except ValueError as exc:
            r.problem("proxy", f"{exc} (or none)")
    username = r.text("username")
    password = r.secret("password")
    if password is not None and username is None:
        r.problem("username", "required with password")
    if proxy == "none" and (username is not None or password is not None):
        r.problem("proxy", "is none: proxy credentials would never be used")
    ca_file = r.text("ca_file")
    if ca_file:
        r.files.append(ca_file)
        if not os.access(ca_file, os.R_OK):
            r.problem("ca_file", f"cannot read {ca_file}")
    r.done()
    return ProxySetting(proxy=proxy, username=username, password=password, ca_file=ca_file)


def _token_url(up_url: str, auth: Auth) -> str | None:
    """Where an upstream's tokens come from, when it has a token endpoint at all."""
    if isinstance(auth, RoyaltiAuth):
        return None if auth.api_key is not None else (auth.auth_url or up_url)
    if isinstance(auth, OAuth2Auth):
        return auth.token_url or None
    return None


def _upstream(r: _Reader, index: int, proxy_env: ProxyEnvironment) -> UpstreamConfig:
    name = r.text("name") or f"upstream{index}"
    url = r.req_str("url", "for every upstream")
    if url and not re.match(r"^https?://[^/?#]+", url):
        r.problem("url", "must be an http:// or https:// URL")
    if "?" in url or "#" in url:
        r.problem("url", "must not contain a query or fragment")
    prefix = r.text("path_prefix", "/") or "/"
    if not prefix.startswith("/"):
        r.problem("path_prefix", "must start with /")
    t = r.child("timeouts")
    timeouts = Timeouts(
        connect=t.duration("connect", 10.0),
        read=t.duration("read", 300.0),
        token=t.duration("token", 10.0),
    )
    for key in ("connect", "read", "token"):
        if getattr(timeouts, key) <= 0:
            t.problem(key, "must be positive")
    # A bad token timeout is reported above, once.
    auth, auth_type = _auth(r.child("auth"))
    t.done()
    replay_on: set[int] = set()
    for s in r.str_list("replay_on") if r.has("replay_on") else ["401"]:
        if not s.isdigit() or not 400 <= int(s) <= 499:
            r.problem("replay_on", f"{s!r} is not a 4xx status")
        else:
            replay_on.add(int(s))
    inj = r.child("inject")
    inject = Inject(
        header=inj.text("header", "Authorization") or "Authorization",
        format=inj.text("format", "Bearer {token}") or "Bearer {token}",
    )
    if "{token}" not in inject.format:
        inj.problem("format", "must contain {token}")
    inj.done()
    up = UpstreamConfig(
        name=name,
        url=url.rstrip("/"),
        auth=auth,
        auth_type=auth_type,
        path_prefix=prefix,
        timeouts=timeouts,
        replay_on=frozenset(replay_on),
        replay_max_body=r.size("replay_max_body", 1024 * 1024),
        max_connections=r.integer("max_connections", 100, minimum=1),
        # Below the 5 s after which Node.js's http server (its long-standing default) and
        # uvicorn close an idle connection: a request sent on a connection as the upstream
        # closes it fails before any response (RFC 9112 §9.5), and a POST or PATCH cannot be
        # sent again. aiohttp's own default, 15 s, is above it.
        keepalive_timeout=r.duration("keepalive_timeout", 4.0),
        max_concurrent=r.integer("max_concurrent", 1000, minimum=1),
        max_body_size=r.size("max_body_size", -1) if r.has("max_body_size") else None,
        tls=_tls(r.child("tls")),
        inject=inject,
        egress=_egress(r.child("egress")),
        token_egress=_egress(r.child("token_egress")) if r.has("token_egress") else None,
    )
    if up.keepalive_timeout <= 0:
        r.problem("keepalive_timeout", "must be positive")
    r.done()
    # Resolved here, once: the request path only uses the result.
    token_url = _token_url(up.url, auth)
    token_setting = up.token_egress or up.egress
    return dataclasses.replace(
        up,
        proxy=resolve(up.url, up.egress, proxy_env) if up.url else None,
        token_proxy=resolve(token_url, token_setting, proxy_env) if token_url else None,
    )


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
    problems: list[str] = []
    proxies = ProxyEnvironment.from_env(env if proxy_env is None else proxy_env, problems)
    r = _Reader(data, "", problems, env)
    listen = r.convert("listen", parse_address(DEFAULT_LISTEN), lambda v: parse_address(str(v)))
    a = r.child("admin")
    admin = AdminConfig(
        listen=a.convert(
            "listen", parse_address(DEFAULT_ADMIN_LISTEN), lambda v: parse_address(str(v))
        ),
        enable_quit=a.flag("enable_quit", False),
        metrics_max_workspaces=a.integer("metrics_max_workspaces", 20, minimum=1),
    )
    a.done()
    inbound = _inbound(r.child("inbound"), listen)
    lim = r.child("limits")
    limits = ClientLimits(
        max_header_size=lim.size("max_header_size", 8190),
        max_headers=lim.integer("max_headers", 100, minimum=1),
        idle_timeout=lim.duration("idle_timeout", 75.0),
        header_timeout=lim.duration("header_timeout", 15.0),
    )
    for key in ("idle_timeout", "header_timeout", "max_header_size"):
        if getattr(limits, key) <= 0:
            lim.problem(key, "must be positive")
    lim.done()
    t = r.child("tokens")
    tokens = TokenSettings(
        idle_timeout=t.duration("idle_timeout", 3600.0),
        max_entries=t.integer("max_entries", 1000, minimum=1),
        min_backoff=t.duration("min_backoff", 1.0),
        max_backoff=t.duration("max_backoff", 300.0),
    )
    if tokens.min_backoff > tokens.max_backoff:
        t.problem("min_backoff", "must not exceed max_backoff")
    t.done()
    token_store = _token_store(r.child("token_store"))
    upstreams: list[UpstreamConfig] = []
    r.seen.add("upstreams")
    raw_ups = r.data.get("upstreams")
    if not isinstance(raw_ups, list) or not raw_ups:
        r.problem("upstreams", "must be a non-empty list")
    else:
        for i, item in enumerate(raw_ups):
            item_reader = _Reader(item, f"upstreams[{i}]", problems, env, r.files)
            upstreams.append(_upstream(item_reader, i, proxies))
    names = [u.name for u in upstreams]
    for i, u in enumerate(upstreams):
        if names.index(u.name) != i:
            problems.append(f"upstreams[{i}].name: duplicate name {u.name!r}")
    prefixes = [u.path_prefix.rstrip("/") for u in upstreams]
    for i, p in enumerate(prefixes):
        if prefixes.index(p) != i:
            problems.append(
                f"upstreams[{i}].path_prefix: duplicate prefix {upstreams[i].path_prefix!r}"
            )
    config = Config(
        upstreams=tuple(upstreams),
        listen=listen,
        admin=admin,
        inbound=inbound,
        limits=limits,
        tokens=tokens,
        token_store=token_store,
        shutdown_timeout=r.duration("shutdown_timeout", 25.0),
        log_format=cast(Literal["json", "text"], r.choice("log_format", "json", ("json", "text"))),
        log_level=(r.text("log_level", "INFO") or "INFO").upper(),
        access_log=r.flag("access_log", False),
        reload_poll=r.duration("reload_poll", 2.0),
        source=source,
        watched_files=tuple(dict.fromkeys(r.files)),
        proxy_env=proxies,
    )
    if config.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append("log_level: must be one of debug, info, warning, error")
    r.done()
    if problems:
        raise ConfigError(problems)
    return config


def from_environment(env: Mapping[str, str]) -> Config:
    """The single-Royalti configuration from ``ROYALTI_*`` variables alone."""
    auth: dict[str, Any] = {"type": "royalti"}
    for var, key in (
        ("ROYALTI_EMAIL", "email"),
        ("ROYALTI_PASSWORD", "password"),
        ("ROYALTI_PASSWORD_FILE", "password_file"),
        ("ROYALTI_REFRESH_TOKEN", "refresh_token"),
        ("ROYALTI_REFRESH_TOKEN_FILE", "refresh_token_file"),
        ("ROYALTI_API_KEY", "api_key"),
        ("ROYALTI_API_KEY_FILE", "api_key_file"),
        ("ROYALTI_WORKSPACE", "default_workspace"),
        ("ROYALTI_ALLOWED_WORKSPACES", "allowed_workspaces"),
        ("ROYALTI_WORKSPACE_HEADER", "workspace_header"),
        ("ROYALTI_USER_ID", "user_id"),
    ):
        if env.get(var):
            auth[key] = env[var]
    data: dict[str, Any] = {
        "listen": env.get("ROYALTI_PROXY_LISTEN", DEFAULT_LISTEN),
        "upstreams": [
            {
                "name": "royalti",
                "url": env.get("ROYALTI_API_URL", DEFAULT_ROYALTI_URL),
                "path_prefix": "/",
                "auth": auth,
            }
        ],
    }
    if env.get("ROYALTI_PROXY_ADMIN_LISTEN"):
        data["admin"] = {"listen": env["ROYALTI_PROXY_ADMIN_LISTEN"]}
    inbound: dict[str, Any] = {}
    for var, key in (
        ("ROYALTI_PROXY_ALLOWED_CIDRS", "allowed_cidrs"),
        ("ROYALTI_PROXY_SHARED_SECRET_FILE", "shared_secret_file"),
        ("ROYALTI_PROXY_SHARED_SECRET_HEADER", "shared_secret_header"),
        ("ROYALTI_PROXY_ALLOW_UNAUTHENTICATED", "allow_unauthenticated"),
    ):
        if env.get(var):
            inbound[key] = env[var]
    if inbound:
        data["inbound"] = inbound
    # Values from the environment are literal: no ${...} expansion inside them.
    return build(_escape(data), {}, source="environment", proxy_env=env)


def _escape(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value


def load(path: str | None, env: Mapping[str, str]) -> Config:
    """The configuration from ``path`` (or ``ROYALTI_PROXY_CONFIG``), else from the environment."""
    path = path or env.get("ROYALTI_PROXY_CONFIG") or None
    if path is None:
        return from_environment(env)
    # Imported here: an environment-only configuration never loads the YAML parser.
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError([f"{path}: not valid YAML{where}"]) from None
    return build(data, env, source=path)
