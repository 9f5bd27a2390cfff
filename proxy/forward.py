"""The proxy handler: route, pick the workspace, inject the credential, stream, replay once.

Everything a request needs that does not depend on the request is resolved into a
:class:`Route` when the proxy starts; the per-request path only looks things up.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from aiohttp.typedefs import LooseHeaders
from multidict import CIMultiDict
from yarl import URL

from proxy import readtimeout
from proxy.egress import Egress, client_session, egress_error
from proxy.errors import (
    ERROR_HEADER,
    BadTarget,
    BodyTooLarge,
    ClientGone,
    EgressProxyError,
    ExpectationFailed,
    NoRoute,
    Overloaded,
    ProxyError,
    UpstreamTimeout,
    UpstreamTLSError,
    UpstreamUnavailable,
    WorkspaceNotAllowed,
    WorkspaceRequired,
)
from proxy.inbound import InboundGuard
from proxy.metrics import RouteStats
from proxy.tokens.manager import TokenManager
from proxy.tokens.rejected import replacement
from proxy.tokens.source import SINGLE_KEY
from proxy.tokens.token import Token
from proxy.websocket import is_upgrade, proxy_websocket

log = logging.getLogger("proxy.forward")
access_log = logging.getLogger("proxy.access")

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
#: Headers aiohttp's client would otherwise add on its own: the upstream must see the client's.
_NO_AUTO_HEADERS: CIMultiDict[None] = CIMultiDict(
    (h, None) for h in ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
)
_STREAM_CHUNK = 64 * 1024
_LARGE_BYTES = 1024 * 1024
#: RFC 9110 §9.2.2: methods a client may send again when a connection fails before the
#: response (TRACE is idempotent too, but the proxy has no reason to send one twice).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def fresh_session(
    *, limit: int, tls: ssl.SSLContext, egress: Egress | None = None
) -> aiohttp.ClientSession:
    """The session of :attr:`Route.fresh_session`: each request on a new connection, closed
    after its response, and no retry of aiohttp's own, so that the proxy's retry is one
    request on one new connection, through the same egress proxy as the route's session."""
    connector = aiohttp.TCPConnector(limit=limit, ssl=tls, force_close=True)
    readtimeout.install(connector)
    session = client_session(
        egress,
        connector=connector,
        auto_decompress=False,
        request_class=ExactHeadersRequest,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False  # the retry aiohttp's client makes on its own
    return session


class ExactHeadersRequest(aiohttp.ClientRequest):
    """A client request that adds none of aiohttp's own headers (``Accept``,
    ``Accept-Encoding``, ``User-Agent``, a default ``Content-Type``): the upstream sees
    the client's. What ``skip_auto_headers=`` does, without building that set into a new
    multidict and copying the request's headers again on every request (7 % more
    throughput: docs/performance.md). The session's ``request_class``."""

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _NO_AUTO_HEADERS

    def update_headers(self, headers: LooseHeaders | None) -> None:
        # aiohttp's own copies the headers one by one in Python, to handle a Host header among
        # them. The forwarder never passes one (it drops the client's): one C-level extend.
        if not isinstance(headers, CIMultiDict) or "Host" in headers:
            super().update_headers(headers)
            return
        host = self.url.host_port_subcomponent
        assert host is not None  # an absolute URL: the upstream's
        out: CIMultiDict[str] = CIMultiDict(Host=host)
        out.extend(headers)
        self.headers = out


class _OneWriteResponse(web.StreamResponse):
    """A response whose head waits for its first body bytes, so that both leave in one write
    (one TCP segment, one wake-up of the client) instead of two, as ``web.Response`` does.
    Used when body bytes are already there; a response whose body has not started yet
    sends its head at once (a client waiting on a slow stream sees the status early)."""

    _send_headers_immediately = False


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


#: How many distinct header names a cache of spellings holds before it starts again.
_NAME_CACHE_SIZE = 512

#: Response header name (as received) -> whether it is passed on to the client.
_response_names: dict[str, bool] = {}


def _passes_response_header(name: str) -> bool:
    low = name.lower()
    keep = low not in HOP_BY_HOP and not low.startswith("proxy-")
    if len(_response_names) >= _NAME_CACHE_SIZE:
        _response_names.clear()  # bounded: header names are the upstream's to choose
    _response_names[name] = keep
    return keep


async def _continue(request: web.BaseRequest) -> None:
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


def error_response(exc: ProxyError) -> web.Response:
    headers = {ERROR_HEADER: exc.code, "Content-Type": "application/json"}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return web.Response(status=exc.status, body=exc.body(), headers=headers)


class _Body:
    """The request body: sent as it arrives, and kept (up to a limit) so it can be replayed."""

    __slots__ = (
        "_chunks",
        "_limit",
        "_max",
        "_request",
        "_size",
        "finished",
        "overflowed",
        "too_large",
    )

    def __init__(self, request: web.BaseRequest, limit: int, max_size: int | None) -> None:
        self._request = request
        self._limit = limit
        self._max = max_size
        self._chunks: list[bytes] = []
        self._size = 0
        self.overflowed = False
        self.finished = False
        self.too_large = False

    async def stream(self) -> AsyncIterator[bytes]:
        async for chunk in self._request.content.iter_chunked(_STREAM_CHUNK):
            self._size += len(chunk)
            if self._max is not None and self._size > self._max:
                self.too_large = True
                raise BodyTooLarge(f"request body is larger than {self._max} bytes")
            if not self.overflowed:
                if self._size <= self._limit:
                    self._chunks.append(chunk)
                else:
                    self.overflowed = True
                    self._chunks = []
            yield chunk
        self.finished = True

    def replayable(self) -> bytes | None:
        """The whole body, or None when it cannot be sent again: too large, or not read to its
        end (an upstream may reject a request before reading its body; replaying what was read
        so far would send a truncated body as if it were complete)."""
        if self.overflowed or not self.finished:
            return None
        return b"".join(self._chunks)


def _data(body: bytes | None) -> bytes | io.BytesIO | None:
    """What aiohttp's client is given to send a kept ``body`` again (the first attempt does
    the same inline, saving a call on the hot path)."""
    if body is not None and len(body) > _LARGE_BYTES:
        return io.BytesIO(body)
    return body


def _retry_body(
    method: str, body: bytes | _Body | None, exc: aiohttp.ClientError
) -> tuple[bytes | None] | None:
    """The body to send again (in a 1-tuple, as it may be None) when a request whose
    connection failed with ``exc`` may be retried; None when it may not: a method that is
    not idempotent, a connection that could not be opened at all (retrying would only wait
    twice), a streamed body that was not kept whole."""
    if method not in IDEMPOTENT or isinstance(exc, aiohttp.ClientConnectorError):
        return None
    if isinstance(body, _Body):
        kept = body.replayable()
        return None if kept is None else (kept,)
    return (body,)


class Forwarder:
    """The request handler of the proxy listener."""

    def __init__(
        self,
        router: Router,
        *,
        access_log_enabled: bool = False,
        guard: InboundGuard | None = None,
    ) -> None:
        self.router = router
        self.guard = guard
        self.access_log = access_log_enabled
        self.in_flight = 0
        self.cancelled = 0
        self.errors: dict[str, int] = {}

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        self.in_flight += 1
        try:
            return await self._handle(request)
        except ProxyError as exc:
            self.errors[exc.code] = self.errors.get(exc.code, 0) + 1
            return error_response(exc)
        except asyncio.CancelledError:
            # The client went away, or shutdown_timeout ran out: counted so shutdown can say so.
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.guard is not None:
            self.guard.check(request)  # before anything else: strangers learn nothing
        target = request.raw_path
        # Origin-form only (RFC 9112 §3.2.1): an absolute-form or authority-form target naming
        # another host must never make us connect anywhere but the configured upstream.
        if not target.startswith("/") or request.method == "CONNECT":
            raise BadTarget("only origin-form request targets are accepted")
        if _has_dot_segment(target):
            raise BadTarget("dot segments (. and ..) are not accepted in the path")
        route, rest = self.router.match(target)
        if route.in_flight >= route.max_concurrent:
            raise Overloaded(f"upstream {route.name} has {route.max_concurrent} requests in flight")
        route.in_flight += 1
        try:
            return await self._forward(request, route, rest)
        finally:
            route.in_flight -= 1

    async def _forward(
        self, request: web.BaseRequest, route: Route, rest: str
    ) -> web.StreamResponse:
        key = route.workspace(request)
        if (
            route.max_body_size is not None
            and request.content_length is not None
            and request.content_length > route.max_body_size
        ):
            raise BodyTooLarge(f"request body is larger than {route.max_body_size} bytes")
        headers = self._forward_headers(request, route)
        url = URL(route.base_url + rest, encoded=True)
        if is_upgrade(request):
            return await proxy_websocket(request, route, key, headers, url)

        # The token first: a client is never told to upload a body (100 Continue) only to get
        # a 503 because no token can be had.
        manager = route.manager
        token = None
        if manager is not None:
            token = manager.cached(key) or await manager.get(key)
        # Expect: 100-continue (RFC 9110 §10.1.1) is answered here, once the request is known to
        # be acceptable; the upstream never sees it. aiohttp's low-level server leaves it to us.
        expect = request.headers.get("Expect")
        expect_continue = False
        if expect is not None:
            if expect.lower() != "100-continue":
                raise ExpectationFailed("only Expect: 100-continue is supported")
            expect_continue = request.version >= (1, 1)
        body: bytes | _Body | None
        if not request.body_exists:
            body = None
        elif request.content_length is not None and request.content_length <= route.replay_max_body:
            if expect_continue:
                await _continue(request)
            try:
                body = await request.content.readexactly(request.content_length)
            except asyncio.IncompleteReadError:
                raise ClientGone("client closed the connection while sending its body") from None
        else:
            if expect_continue:
                await _continue(request)
            body = _Body(
                request,
                route.replay_max_body if request.content_length is None else -1,
                route.max_body_size,
            )
        resp = await self._send(route, request.method, url, headers, body, token)
        try:
            if token is not None and resp.status in route.replay_on:
                assert manager is not None
                resp = await self._replay(
                    route, manager, key, token, request.method, url, headers, body, resp
                )
            route.stats.record(request.method, resp.status)
            if self.access_log:
                access_log.info(
                    "request",
                    extra={
                        "event": "access",
                        "upstream": route.name,
                        "workspace": key,
                        "method": request.method,
                        "path": request.path,  # without the query, which may carry personal data
                        "status": resp.status,
                        "remote": request.remote,
                    },
                )
            return await self._relay(request, resp)
        finally:
            resp.release()

    async def _replay(
        self,
        route: Route,
        manager: TokenManager,
        key: str,
        token: Token,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes | _Body | None,
        resp: aiohttp.ClientResponse,
    ) -> aiohttp.ClientResponse:
        """The upstream rejected ``token``: drop it if it is still the cached one, and send the
        request once more with a fresh token when the body can be sent again."""
        replay_body = body.replayable() if isinstance(body, _Body) else body
        if isinstance(body, _Body) and replay_body is None:
            # No replay, but the next request must not be sent with the rejected token either.
            manager.invalidate(key, token)
            return resp
        fresh = await replacement(manager, key, token)
        if fresh is None:
            return resp  # nothing better to offer than the upstream's own answer
        resp.release()
        route.stats.replays += 1
        log.info(
            "token rejected by upstream; request replayed with a fresh token",
            extra={
                "event": "request_replayed",
                "upstream": route.name,
                "workspace": key,
                "status": resp.status,
                "fingerprint": fresh.fingerprint,
            },
        )
        return await self._send(route, method, url, headers, replay_body, fresh)

    @staticmethod
    def _forward_headers(request: web.BaseRequest, route: Route) -> CIMultiDict[str]:
        headers = request.headers
        extra: frozenset[str] = frozenset()
        if "Connection" in headers:
            extra = _connection_extra(route.drop, tuple(headers.getall("Connection")))
        names = route.header_names
        out: CIMultiDict[str] = CIMultiDict()
        # aiohttp's client keeps only the last of two names that differ in case (it dedupes
        # case-sensitively), so repeats are added under the first spelling seen.
        spelling: dict[str, str] = {}
        for name, value in headers.items():
            low = names.get(name)
            if low is None:
                low = route.classify(name)
            if low and not (extra and low in extra):
                out.add(spelling.setdefault(low, name), value)
        peer = request.remote or ""
        prior = headers.get("X-Forwarded-For")
        if prior is not None:
            prior = ", ".join(headers.getall("X-Forwarded-For"))
            peer = f"{prior}, {peer}" if prior else peer
        out.add("X-Forwarded-For", peer)
        out.add("X-Forwarded-Proto", request.scheme)
        # The client's Host header as sent (request.host would fall back to this machine's
        # name, looked up in DNS, when there is none).
        host = headers.get("Host")
        if host:
            out.add("X-Forwarded-Host", host)
        return out

    async def _send(
        self,
        route: Route,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes | _Body | None,
        token: Token | None,
    ) -> aiohttp.ClientResponse:
        """The one boundary where aiohttp's client errors become the proxy's own."""
        if token is not None:
            headers[route.inject_header] = route.credential(token)
        start = time.perf_counter()
        try:
            data: bytes | io.BytesIO | AsyncIterator[bytes] | None
            if isinstance(body, _Body):
                data = body.stream()
            elif body is not None and len(body) > _LARGE_BYTES:
                data = io.BytesIO(body)  # aiohttp writes large bytes in one blocking call
            else:
                data = body
            try:
                resp = await route.session.request(
                    method,
                    url,
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                    timeout=route.timeout,
                )
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # Raised before the response headers were complete, so no byte of the
                # response has reached the client. A pooled connection the upstream closed
                # while it sat idle (RFC 9112 §9.5) fails this way, and aiohttp's own one
                # retry takes another pooled connection, which may be just as stale. One more
                # try, on a new connection, when sending the request twice is allowed
                # (RFC 9110 §9.2.2).
                again = _retry_body(method, body, exc)
                if again is None:
                    raise
                route.stats.stale_retries += 1
                log.debug(
                    "upstream connection failed before the response; retried on a new one",
                    extra={
                        "event": "request_retried",
                        "upstream": route.name,
                        "error": type(exc).__name__,
                    },
                )
                resp = await (route.fresh_session or route.session).request(
                    method,
                    url,
                    headers=headers,
                    data=_data(again[0]),
                    allow_redirects=False,
                    timeout=route.timeout,
                )
            route.stats.duration.observe(time.perf_counter() - start)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(f"upstream {route.name} did not answer in time") from exc
        except (aiohttp.ClientProxyConnectionError, aiohttp.ClientHttpProxyError) as exc:
            route.stats.egress_errors += 1
            raise egress_error(route.name, route.egress_proxy, exc) from exc
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
            raise UpstreamTLSError(f"TLS to upstream {route.name} failed to verify") from exc
        except aiohttp.ClientError as exc:
            if isinstance(body, _Body) and body.too_large:
                raise BodyTooLarge(
                    f"request body is larger than {route.max_body_size} bytes"
                ) from exc
            raise UpstreamUnavailable(
                f"upstream {route.name} unreachable ({type(exc).__name__})"
            ) from exc
        if resp.status == 407 and route.egress_proxy is not None:
            route.stats.egress_errors += 1
            # Only a proxy answers 407 (RFC 9110 §15.5.8): ours, refusing a plain-HTTP request.
            resp.release()
            raise EgressProxyError(
                f"upstream {route.name} unreachable: the egress proxy {route.egress_proxy} "
                "refused the request (407)"
            )
        return resp

    @staticmethod
    async def _relay(request: web.BaseRequest, resp: aiohttp.ClientResponse) -> web.StreamResponse:
        content = resp.content
        try:
            first = content.read_nowait()  # what has arrived with the headers, without waiting
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            first = b""  # the loop below meets the same error, and aborts
        complete = content.is_eof()
        cls = _OneWriteResponse if first or complete else web.StreamResponse
        out = cls(status=resp.status, reason=resp.reason)
        headers = resp.headers
        extra: frozenset[str] = frozenset()
        if "Connection" in headers:
            extra = _connection_extra(HOP_BY_HOP, tuple(headers.getall("Connection")))
        names = _response_names
        kept = []
        for item in headers.items():
            keep = names.get(item[0])
            if keep is None:
                keep = _passes_response_header(item[0])
            if keep and not (extra and item[0].lower() in extra):
                kept.append(item)
        out.headers.extend(kept)
        await out.prepare(request)
        if complete:
            # The whole body has already arrived (any small response): it leaves with the
            # headers in one write, without the async iterator.
            await out.write_eof(first)
            return out
        try:
            if first:
                await out.write(first)  # with the headers, in one write
            async for chunk in content.iter_any():
                await out.write(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            # Never let a truncated body look complete: abort the client's connection instead of
            # ending the response normally.
            log.warning(
                "upstream response broke off; aborting the client connection",
                extra={"event": "upstream_aborted", "error": type(exc).__name__},
            )
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError from exc
        await out.write_eof()
        return out
