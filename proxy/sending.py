"""Sending a request upstream: the client request that adds no headers of its own, the request
body (streamed, and kept up to a limit so it can be sent again), the one retry of an idempotent
request whose pooled connection failed, the one replay with a fresh token of a request the
upstream rejected, and the boundary where aiohttp's client errors become the proxy's own."""

from __future__ import annotations

import io
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Iterable

import aiohttp
from aiohttp import web
from aiohttp.typedefs import LooseHeaders
from multidict import CIMultiDict
from yarl import URL

from proxy import readtimeout
from proxy.direct import send_directly
from proxy.egress import Egress, client_session, egress_error
from proxy.errors import (
    BodyTooLarge,
    EgressProxyError,
    UpstreamTimeout,
    UpstreamTLSError,
    UpstreamUnavailable,
)
from proxy.routing import Route
from proxy.tokens.manager import TokenManager
from proxy.tokens.rejected import replacement
from proxy.tokens.token import Token

log = logging.getLogger("proxy.forward")

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
    *, limit: int, tls: ssl.SSLContext | bool, egress: Egress | None = None
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


async def replay(
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
    return await send(route, method, url, headers, replay_body, fresh)


def _request(
    session: aiohttp.ClientSession,
    route: Route,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    data: bytes | io.BytesIO | AsyncIterator[bytes] | None,
) -> Awaitable[aiohttp.ClientResponse]:
    """The request as the route sends it: no redirect followed, the route's timeouts. Not a
    coroutine: it hands back aiohttp's awaitable, so the hot path gains no frame."""
    if route.direct:
        return send_directly(session, route.timeout, method, url, headers, data)
    return session.request(
        method, url, headers=headers, data=data, allow_redirects=False, timeout=route.timeout
    )


async def send(
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
            resp = await _request(route.session, route, method, url, headers, data)
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
            session = route.fresh_session or route.session
            resp = await _request(session, route, method, url, headers, _data(again[0]))
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
            raise BodyTooLarge(f"request body is larger than {route.max_body_size} bytes") from exc
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
