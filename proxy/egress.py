"""Outbound (egress) HTTP proxies: which one, if any, each upstream and token endpoint goes through.

Everything here is decided once, when the configuration is loaded: the environment
(``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``, either case) is read at that edge into a
:class:`ProxyEnvironment`, each upstream's own ``egress`` setting into a :class:`ProxySetting`,
and :func:`resolve` turns both into an :class:`Egress` (or None: connect directly) per target.
The request path never looks at any of it again: the upstream's client session carries the
proxy as its default.

Precedence: the upstream's setting (a URL, or ``none``) > the environment > no proxy.

HTTPS targets are reached through ``CONNECT`` (RFC 9110 §9.3.6), so TLS runs end to end and the
egress proxy sees neither the token nor the request; plain-HTTP targets through an absolute-form
request (RFC 9112 §3.2.2), which the egress proxy does see.
"""

from __future__ import annotations

import ipaddress
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import aiohttp

from proxy.errors import EgressProxyError
from proxy.secret import Secret

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# -- NO_PROXY -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    host: str | None
    """A domain suffix (lower case, no leading dot), or None for an address entry."""
    network: IPNetwork | None
    port: int | None


@dataclass(frozen=True, slots=True)
class NoProxy:
    """The hosts that are reached directly although a proxy is set (``NO_PROXY``).

    Rules (those of curl and Go's ``httpproxy``, where they agree):

    - entries are separated by commas (and/or white space), compared without case;
    - ``*`` alone bypasses the proxy for every host;
    - ``example.com``, ``.example.com`` and ``*.example.com`` all match ``example.com`` and every
      name below it (``api.example.com``), but not ``badexample.com``;
    - an IP address matches that address; a CIDR (``10.0.0.0/8``, ``fd00::/8``) every address in
      it. Only a literal address in the URL is compared: names are not resolved;
    - ``host:port`` (``[v6]:port`` for IPv6) matches that host on that port only.

    Loopback is not bypassed implicitly (Go does so; curl does not): list ``localhost`` and
    ``127.0.0.1`` when they should be.
    """

    entries: tuple[_Entry, ...] = ()
    everything: bool = False

    @classmethod
    def parse(cls, text: str) -> NoProxy:
        """Parse a ``NO_PROXY`` value. Raises ValueError naming the first malformed entry."""
        entries: list[_Entry] = []
        for raw in text.replace(",", " ").split():
            item = raw.strip().lower()
            if item == "*":
                return cls(everything=True)
            entries.append(_parse_entry(item))
        return cls(entries=tuple(entries))

    def matches(self, host: str, port: int) -> bool:
        """Whether ``host`` (a name or a literal address, IPv6 without brackets) on ``port``
        bypasses the proxy."""
        if self.everything:
            return True
        host = host.lower().rstrip(".").strip("[]")
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(
                host
            )
        except ValueError:
            address = None
        for e in self.entries:
            if e.port is not None and e.port != port:
                continue
            if e.network is not None:
                if (
                    address is not None
                    and address.version == e.network.version
                    and address in e.network
                ):
                    return True
            elif (
                e.host is not None
                and address is None
                and (host == e.host or host.endswith("." + e.host))
            ):
                return True
        return False


def _parse_entry(item: str) -> _Entry:
    port: int | None = None
    host = item
    if item.startswith("["):  # [v6] or [v6]:port
        end = item.find("]")
        if end < 0:
            raise ValueError(f"{item!r} is not a host, address or CIDR")
        host, rest = item[1:end], item[end + 1 :]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"{item!r} has a malformed port")
            port = int(rest[1:])
    elif item.count(":") == 1:  # host:port or v4:port (a bare IPv6 address has several colons)
        host, _, port_s = item.partition(":")
        if not port_s.isdigit():
            raise ValueError(f"{item!r} has a malformed port")
        port = int(port_s)
    if port is not None and not 0 < port <= 65535:
        raise ValueError(f"{item!r} has a port out of range")
    if "/" in host:
        try:
            return _Entry(None, ipaddress.ip_network(host, strict=False), port)
        except ValueError:
            raise ValueError(f"{item!r} is not a valid CIDR") from None
    try:
        return _Entry(None, ipaddress.ip_network(host), port)
    except ValueError:
        pass
    name = host.removeprefix("*").lstrip(".").rstrip(".")
    if not name or ":" in name:
        raise ValueError(f"{item!r} is not a host, address or CIDR")
    return _Entry(name, None, port)


# -- proxy URLs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyURL:
    """A proxy URL split into where to connect and the credentials it carried, if any."""

    url: str
    """``scheme://host:port``, never with credentials: safe to log."""
    username: str | None = None
    password: Secret | None = None


def parse_proxy_url(text: str) -> ProxyURL:
    """``http://[user:password@]host[:port]`` (``https://`` for a proxy spoken to over TLS).

    Raises ValueError with a message that never repeats the text (it may hold a password).
    A URL without a scheme (``proxy.corp:3128``, as some tools accept) is taken as ``http://``.
    """
    text = text.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid proxy URL") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// proxy URL")
    if not parts.hostname:
        raise ValueError("has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must not have a path, query or fragment")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    password = Secret(unquote(parts.password)) if parts.password is not None else None
    username = unquote(parts.username) if parts.username is not None else None
    return ProxyURL(f"{parts.scheme}://{host}:{port}", username, password)


# -- the environment ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyEnvironment:
    """``HTTPS_PROXY``, ``HTTP_PROXY`` and ``NO_PROXY`` as read once from the environment."""

    https_proxy: ProxyURL | None = None
    http_proxy: ProxyURL | None = None
    no_proxy: NoProxy = NoProxy()

    @classmethod
    def from_env(cls, env: Mapping[str, str], problems: list[str]) -> ProxyEnvironment:
        """Read the variables from ``env``; upper case wins when both spellings are set (as in
        Go's ``httpproxy``). Malformed values are appended to ``problems`` (never their text)."""
        found: dict[str, ProxyURL | None] = {}
        for name in ("HTTPS_PROXY", "HTTP_PROXY"):
            var, value = _lookup(env, name)
            found[name] = None
            if value:
                try:
                    found[name] = parse_proxy_url(value)
                except ValueError as exc:
                    problems.append(f"{var}: {exc}")
        no_proxy = NoProxy()
        var, value = _lookup(env, "NO_PROXY")
        if value:
            try:
                no_proxy = NoProxy.parse(value)
            except ValueError as exc:
                problems.append(f"{var}: {exc}")
        return cls(found["HTTPS_PROXY"], found["HTTP_PROXY"], no_proxy)


def _lookup(env: Mapping[str, str], name: str) -> tuple[str, str]:
    for var in (name, name.lower()):
        value = env.get(var, "").strip()
        if value:
            return var, value
    return name, ""


# -- per-upstream settings and their resolution -------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxySetting:
    """An upstream's (or its token endpoint's) own ``egress`` section."""

    proxy: ProxyURL | Literal["none"] | None = None
    """A proxy URL, ``none`` to connect directly whatever the environment says, or None to
    follow the environment."""
    username: str | None = None
    password: Secret | None = None
    """Proxy credentials (``Proxy-Authorization: Basic``, RFC 9110 §11.7.2), from a file."""
    ca_file: str | None = None
    """Extra CA certificates to trust: those of an egress proxy that intercepts TLS."""


@dataclass(frozen=True, slots=True)
class Egress:
    """The egress proxy one target is reached through."""

    url: str
    """``scheme://host:port`` without credentials: safe to log and show."""
    origin: Literal["upstream", "environment"]
    """Whether the upstream's setting or the environment chose it."""
    username: str | None = None
    password: Secret | None = None

    def basic_auth(self) -> aiohttp.BasicAuth | None:
        """The ``Proxy-Authorization`` credentials, for the client session (built once)."""
        if self.username is None and self.password is None:
            return None
        with warnings.catch_warnings():  # see client_session()
            warnings.filterwarnings("ignore", r".*BasicAuth is deprecated", DeprecationWarning)
            return aiohttp.BasicAuth(
                self.username or "", self.password.reveal() if self.password else ""
            )

    def describe(self) -> str:
        origin = "the upstream setting" if self.origin == "upstream" else "the environment"
        return f"{self.url} (from {origin})"


def resolve(target: str, setting: ProxySetting, env: ProxyEnvironment) -> Egress | None:
    """The egress proxy for ``target`` (an ``http(s)://`` URL), or None to connect directly."""
    if setting.proxy == "none":
        return None
    origin: Literal["upstream", "environment"]
    if isinstance(setting.proxy, ProxyURL):
        chosen, origin = setting.proxy, "upstream"
    else:
        parts = urlsplit(target)
        scheme = parts.scheme.lower()
        # WebSocket URLs are built from the upstream's http(s) URL, so only these two occur.
        chosen_env = env.https_proxy if scheme == "https" else env.http_proxy
        if chosen_env is None:
            return None
        port = parts.port or (443 if scheme == "https" else 80)
        if env.no_proxy.matches(parts.hostname or "", port):
            return None
        chosen, origin = chosen_env, "environment"
    username = setting.username if setting.username is not None else chosen.username
    password = setting.password if setting.password is not None else chosen.password
    return Egress(chosen.url, origin, username, password)


def client_session(egress: Egress | None, **kwargs: Any) -> aiohttp.ClientSession:
    """An ``aiohttp.ClientSession`` whose default proxy is ``egress`` (direct when None), for
    every request and WebSocket handshake it sends: the request path passes nothing.
    ``trust_env`` stays off: the environment was read once, at load."""
    if egress is None:
        return aiohttp.ClientSession(**kwargs)
    # aiohttp 3.14 deprecates proxy_auth for per-request proxy_headers, but those are sent only
    # on CONNECT, never on a plain-HTTP absolute-form request, and would be copied on every
    # request. The session-level proxy_auth does both, built once: its warning is silenced here,
    # at start-up, and nowhere else.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*BasicAuth is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r".*'proxy_auth' parameter", DeprecationWarning)
        return aiohttp.ClientSession(proxy=egress.url, proxy_auth=egress.basic_auth(), **kwargs)


def egress_error(
    upstream: str,
    proxy_url: str | None,
    exc: aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError,
) -> EgressProxyError:
    """The error for a forwarded request or handshake whose egress proxy, not the upstream,
    failed: unreachable, or it refused the ``CONNECT``. Names the proxy by its URL, which never
    holds credentials."""
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        what = f"refused the CONNECT ({exc.status})"
    else:
        what = "could not be reached"
    return EgressProxyError(f"upstream {upstream} unreachable: the egress proxy {proxy_url} {what}")
