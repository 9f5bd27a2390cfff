"""The proxy handler: route, pick the workspace, inject the credential, stream, replay once.

The request path in order: :class:`Forwarder` checks the target and finds the route
(:mod:`proxy.routing`), builds the forwarded headers, reads or streams the body and sends it with
the token (:mod:`proxy.sending`, which also retries and replays), then relays the answer
(:mod:`proxy.relaying`). The names other modules use are re-exported here.
"""

from __future__ import annotations

import asyncio
import logging
import math

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.errors import (
    ERROR_HEADER,
    BadTarget,
    BodyTooLarge,
    ClientGone,
    ExpectationFailed,
    Overloaded,
    ProxyError,
)
from proxy.inbound import InboundGuard
from proxy.relaying import relay
from proxy.routing import HOP_BY_HOP, Route, Router, _connection_extra, _has_dot_segment
from proxy.sending import ExactHeadersRequest, _Body, fresh_session, replay, send
from proxy.websocket import is_upgrade, proxy_websocket

__all__ = [
    "HOP_BY_HOP",
    "ExactHeadersRequest",
    "Forwarder",
    "Route",
    "Router",
    "error_response",
    "fresh_session",
]

log = logging.getLogger("proxy.forward")
access_log = logging.getLogger("proxy.access")


async def _continue(request: web.BaseRequest) -> None:
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


def error_response(exc: ProxyError) -> web.Response:
    headers = {ERROR_HEADER: exc.code, "Content-Type": "application/json"}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return web.Response(status=exc.status, body=exc.body(), headers=headers)


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
        resp = await send(route, request.method, url, headers, body, token)
        try:
            if token is not None and resp.status in route.replay_on:
                assert manager is not None
                resp = await replay(
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
            return await relay(request, resp)
        finally:
            resp.release()

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
