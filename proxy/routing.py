"""Where a request goes: the routes resolved once at start-up, the longest-prefix router, and
the header rules that depend only on a route (what is dropped, how the credential is written).

Everything a request needs that does not depend on the request is resolved into a
:class:`Route` when the proxy starts; the per-request path only looks things up.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from proxy.errors import NoRoute, WorkspaceNotAllowed, WorkspaceRequired
from proxy.metrics import RouteStats
from proxy.tokens.manager import TokenManager
from proxy.tokens.source import SINGLE_KEY
from proxy.tokens.token import Token

#: RFC 9110 §7.6.1 hop-by-hop headers. Lower case. Every ``Proxy-*`` header is dropped too.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Request headers never forwarded as the client sent them.
_REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
}
#: How many distinct header names a cache of spellings holds before it starts again.
_NAME_CACHE_SIZE = 512


@dataclass(slots=True)
class Route:
    """One upstream, resolved once at start-up."""

    name: str
    prefix: str
    """The path prefix without its trailing slash; ``""`` for ``/``."""
    base_url: str
    """The upstream URL, with its base path, without a trailing slash."""
    session: aiohttp.ClientSession
    timeout: aiohttp.ClientTimeout
    fresh_session: aiohttp.ClientSession | None = None
    """A session whose every request goes on a new connection, for the one retry of an
    idempotent request whose pooled connection failed; ``session`` when None."""
    manager: TokenManager | None = None
    per_workspace: bool = False
    default_workspace: str | None = None
    allowed_workspaces: frozenset[str] = frozenset()
    workspace_header: str | None = None
    inject_header: str = "Authorization"
    inject_format: str = "Bearer {token}"
    replay_on: frozenset[int] = frozenset({401})
    replay_max_body: int = 1024 * 1024
    max_concurrent: int = 1000
    max_body_size: int | None = None
    also_drop: frozenset[str] = frozenset()
    """Further request headers to remove (the inbound shared-secret header)."""
    direct: bool = False
    """Whether requests skip ``ClientSession.request`` for the leaner path that
    :func:`proxy.direct.can_send_directly` allowed, decided when the route was built."""
    egress_proxy: str | None = None
    """The egress proxy's URL (no credentials) when the session goes through one: for errors."""
    drop: frozenset[str] = field(default=frozenset())
    """Request headers (lower case) removed before forwarding: hop-by-hop, the workspace header,
    the header the credential is injected into."""
    in_flight: int = 0
    """Requests using this route now (a replaced route is closed only when this is 0)."""
    stats: RouteStats = field(default_factory=RouteStats)
    """Counters read by the metrics collector."""
    header_names: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    """Request header name as received -> :meth:`classify`'s verdict, so that filtering the
    headers costs one look-up per header."""
    _pre: str = field(default="", init=False, repr=False)
    _post: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        drop = set(_REQUEST_DROP) | {h.lower() for h in self.also_drop}
        if self.manager is not None:
            # The client's own credentials never travel alongside ours, whatever header ours is
            # injected into. (With auth type none the client's headers pass through.)
            drop |= {self.inject_header.lower(), "authorization"}
        if self.workspace_header:
            drop.add(self.workspace_header.lower())
        self.drop = frozenset(drop)
        self._pre, _, self._post = self.inject_format.partition("{token}")

    def classify(self, name: str) -> str:
        """Request header ``name`` in lower case, or ``""`` when it is never forwarded
        (hop-by-hop, ``Proxy-*``, the workspace header, the client's own credentials).
        Remembered in :attr:`header_names`, which starts again when it grows too large."""
        low = name.lower()
        if low in self.drop or low.startswith("proxy-"):
            low = ""
        names = self.header_names
        if len(names) >= _NAME_CACHE_SIZE:
            names.clear()  # bounded: header names are the clients' to choose
        names[name] = low
        return low

    def credential(self, token: Token) -> str:
        return f"{self._pre}{token.value}{self._post}"

    def workspace(self, request: web.BaseRequest) -> str:
        if not self.per_workspace:
            return SINGLE_KEY
        assert self.workspace_header is not None
        ws = request.headers.get(self.workspace_header) or self.default_workspace
        if not ws:
            raise WorkspaceRequired(
                f"no workspace: send the {self.workspace_header} header "
                "or configure default_workspace"
            )
        if self.allowed_workspaces and ws not in self.allowed_workspaces:
            raise WorkspaceNotAllowed("workspace is not in this proxy's allowed_workspaces")
        return ws


class Router:
    """Longest path prefix wins."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)

    def match(self, path: str) -> tuple[Route, str]:
        """The route for a raw request target and the target with the prefix stripped."""
        for route in self.routes:
            p = route.prefix
            if not p:
                return route, path
            if path.startswith(p):
                rest = path[len(p) :]
                if not rest:
                    return route, "/"
                if rest[0] == "/":
                    return route, rest
                if rest[0] == "?":
                    return route, "/" + rest
        raise NoRoute("no upstream is configured for this path")


def _has_dot_segment(target: str) -> bool:
    """Whether the path has a ``.`` or ``..`` segment, also when its dots or slashes are
    percent-encoded: such a path could leave the upstream's base path once the upstream
    normalises it (RFC 3986 §5.2.4)."""
    path = target.split("?", 1)[0]
    if "." not in path and "%" not in path:
        return False  # the common case, decided without allocating
    decoded = path.replace("%2e", ".").replace("%2E", ".").replace("%2f", "/").replace("%2F", "/")
    return any(seg in (".", "..") for seg in decoded.replace("\\", "/").split("/"))


def _connection_tokens(values: list[str]) -> frozenset[str]:
    """The header names listed by every ``Connection`` field line (RFC 9110 §7.6.1)."""
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


@functools.lru_cache(maxsize=64)
def _connection_extra(drop: frozenset[str], connection: tuple[str, ...]) -> frozenset[str]:
    """The headers ``connection`` names that ``drop`` does not already hold. Cached: nearly
    every message says ``Connection: keep-alive`` or ``close`` (an empty result), so on the hot
    path this is a dict look-up."""
    return _connection_tokens(list(connection)) - drop
