"""The settings of one upstream (:class:`UpstreamConfig`): routing, timeouts, TLS, token
injection and egress proxy. Each class's cross-field rules are its ``_check``."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

from proxy.egress import Egress, ProxySetting, ProxyURL, parse_proxy_url, resolve

from .auth import AUTH_VARIANTS, Auth, AuthType, OAuth2Auth, RoyaltiAuth
from .fields import CHECKS, DURATION, OVERLAYS, SIZE, key
from .values import parse_4xx
from .walk import Checks

DEFAULT_ROYALTI_URL = "https://api.royalti.io"
_HTTP_URL = re.compile(r"^https?://[^/?#]+")


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """TLS towards the upstream."""

    verify: Annotated[bool, key("false turns certificate verification off: for tests only.")] = True
    ca_file: Annotated[
        str | None, key("Trust this CA (PEM) in addition to the system's.", path="read")
    ] = None
    cert_file: Annotated[
        str | None, key("A client certificate (mutual TLS), PEM.", path="read")
    ] = None
    key_file: Annotated[str | None, key("Its key; requires cert_file.", path="read")] = None

    def _check(self, c: Checks) -> TLSSettings:
        if self.key_file and not self.cert_file:
            c.problem("cert_file", "required with key_file")
        return self


@dataclass(frozen=True, slots=True)
class Inject:
    """Where and how the token is put on each forwarded request (the client's own value of that
    header is never forwarded)."""

    header: Annotated[str, key("The header the token goes in.")] = "Authorization"
    format: Annotated[str, key("Its value; {token} is replaced by the token.")] = "Bearer {token}"

    def _check(self, c: Checks) -> Inject:
        if "{token}" not in self.format:
            c.problem("format", "must contain {token}")
        return self


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long the proxy waits on the upstream and on its token endpoint."""

    connect: Annotated[float, DURATION, key("Opening a connection to the upstream.")] = 10.0
    read: Annotated[float, DURATION, key("Waiting for the upstream's next bytes.")] = 300.0
    token: Annotated[float, DURATION, key("One call to the token endpoint.")] = 10.0

    def _check(self, c: Checks) -> Timeouts:
        for name in ("connect", "read", "token"):
            if getattr(self, name) <= 0:
                c.problem(name, "must be positive")
        return self


def _proxy(value: object) -> ProxyURL | Literal["none"] | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("must be a string")
    text = str(value)
    if text.strip().lower() == "none":
        return "none"
    try:
        return parse_proxy_url(text) if text else None
    except ValueError as exc:
        raise ValueError(f"{exc} (or none)") from None


# ProxySetting lives in proxy.egress, which does not import this package: declared here.
OVERLAYS[ProxySetting] = {
    "proxy": key(
        "An outbound HTTP proxy, http://host:port (https:// to speak TLS to it), or none: "
        "connect directly whatever the environment says.",
        parse=_proxy,
        type_doc="URL or none",
        default_doc="HTTPS_PROXY/HTTP_PROXY/NO_PROXY from the environment",
    ),
    "username": key("Proxy-Authorization: Basic user name."),
    "password": key("Its password (give it as password_file)."),
    "ca_file": key("The CA of an egress proxy that intercepts TLS (PEM).", path="read"),
}


def _check_egress(setting: ProxySetting, c: Checks) -> ProxySetting:
    if setting.password is not None and setting.username is None:
        c.problem("username", "required with password")
    if setting.proxy == "none" and (setting.username is not None or setting.password is not None):
        c.problem("proxy", "is none: proxy credentials would never be used")
    return setting


CHECKS[ProxySetting] = _check_egress


def _token_url(up_url: str, auth: Auth) -> str | None:
    """Where an upstream's tokens come from, when it has a token endpoint at all."""
    if isinstance(auth, RoyaltiAuth):
        return None if auth.api_key is not None else (auth.auth_url or up_url)
    if isinstance(auth, OAuth2Auth):
        return auth.token_url or None
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    """One upstream. Requests are routed by path prefix; the longest matching prefix wins and is
    stripped."""

    name: Annotated[
        str, key("Unique; used in logs, metrics and error messages.", default_doc="upstream<N>")
    ] = ""
    url: Annotated[
        str,
        key(
            "The upstream's base URL; a base path (https://host/v2) is prepended to every "
            f"request. In environment-only mode: {DEFAULT_ROYALTI_URL} unless set.",
            required="for every upstream",
            env="ROYALTI_API_URL",
        ),
    ]
    path_prefix: Annotated[
        str, key('Requests whose path starts with this go here ("/" takes everything else).')
    ] = "/"
    timeouts: Annotated[Timeouts, key("Timeouts.")] = field(default_factory=Timeouts)
    auth: Annotated[
        Auth, key("The credential the proxy adds to each request.", variants=AUTH_VARIANTS)
    ]
    auth_type: Annotated[AuthType, key("The type of the auth section.", derived=True, tag="auth")]
    replay_on: Annotated[
        frozenset[int],
        key(
            "Statuses (4xx) on which the token is dropped and the request sent once more with a "
            "fresh one: a list, or one comma-separated string.",
            item=parse_4xx,
        ),
    ] = frozenset({401})
    replay_max_body: Annotated[
        int,
        SIZE,
        key(
            "Request bodies up to this size are kept so that they can be replayed; larger ones "
            "stream through without a copy and their 401 goes back to the client."
        ),
    ] = 1024 * 1024
    max_connections: Annotated[int, key("Connections kept to this upstream.", ge=1)] = 100
    keepalive_timeout: Annotated[
        float,
        DURATION,
        key(
            "How long an idle connection stays in the pool for the next request. Keep it below "
            "the upstream's own idle timeout (Node.js and uvicorn: 5 s; nginx: 75 s)."
        ),
    ] = 4.0
    """Seconds an idle pooled connection to the upstream is kept for reuse: below the 5 s after
    which Node.js's http server (its long-standing default) and uvicorn close an idle
    connection. A request sent on a connection as the upstream closes it fails before any
    response (RFC 9112 §9.5), and a POST or PATCH cannot be sent again. aiohttp's own default,
    15 s, is above it."""
    max_concurrent: Annotated[
        int,
        key("Requests handled at once for this upstream; beyond it, 503 OVERLOADED.", ge=1),
    ] = 1000
    max_body_size: Annotated[
        int | None,
        SIZE,
        key(
            "Largest request body accepted; beyond it, 413 BODY_TOO_LARGE.", default_doc="no limit"
        ),
    ] = None
    tls: Annotated[TLSSettings, key("TLS towards the upstream.")] = field(
        default_factory=TLSSettings
    )
    inject: Annotated[Inject, key("How the token is put on each forwarded request.")] = field(
        default_factory=Inject
    )
    egress: Annotated[
        ProxySetting,
        key(
            "Outbound (egress) HTTP proxy. Without it the proxy follows HTTPS_PROXY, HTTP_PROXY "
            "and NO_PROXY; precedence: this setting > the environment > no proxy."
        ),
    ] = field(default_factory=ProxySetting)
    token_egress: Annotated[
        ProxySetting | None,
        key(
            "The same, for the token endpoints (login, authtoken, an OAuth2 token_url).",
            default_doc="as egress",
        ),
    ] = None
    proxy: Annotated[
        Egress | None,
        key(
            "The egress proxy forwarded requests and WebSocket handshakes go through (resolved "
            "at load from egress and the environment); None: direct.",
            derived=True,
        ),
    ] = None
    token_proxy: Annotated[
        Egress | None,
        key(
            "The egress proxy the token endpoint (login, authtoken, OAuth2 token) is reached "
            "through; None: direct.",
            derived=True,
        ),
    ] = None

    def _check(self, c: Checks) -> UpstreamConfig:
        url = self.url
        if url and not _HTTP_URL.match(url):
            c.problem("url", "must be an http:// or https:// URL")
        if "?" in url or "#" in url:
            c.problem("url", "must not contain a query or fragment")
        if not self.path_prefix.startswith("/"):
            c.problem("path_prefix", "must start with /")
        if self.keepalive_timeout <= 0:
            c.problem("keepalive_timeout", "must be positive")
        url = url.rstrip("/")
        # Resolved here, once: the request path only uses the result.
        token_url = _token_url(url, self.auth)
        env = c.walk.proxy_env
        return dataclasses.replace(
            self,
            name=self.name or f"upstream{c.index or 0}",
            url=url,
            proxy=resolve(url, self.egress, env) if url else None,
            token_proxy=resolve(token_url, self.token_egress or self.egress, env)
            if token_url
            else None,
        )
