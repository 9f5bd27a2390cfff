"""Who may call the proxy, and how much a client may ask of it.

A process that adds an account's credentials to whatever it is sent must be reachable only by its
app. By default it listens on loopback; on any other address it refuses to start unless an
inbound guard is configured: ``inbound.allowed_cidrs``, a shared secret header, or a Unix socket
(``inbound.allow_unauthenticated: true`` overrides, loudly).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from proxy.errors import ClientNotAllowed, ClientUnauthenticated

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class InboundGuard:
    """Checks each request's peer address and shared secret; built once at start-up."""

    __slots__ = ("_header", "_networks", "_secret")

    def __init__(
        self,
        *,
        networks: tuple[Network, ...] = (),
        secret: bytes | None = None,
        header: str = "X-Proxy-Secret",
    ) -> None:
        self._networks = networks
        self._secret = secret
        self._header = header

    def check(self, request: web.BaseRequest) -> None:
        if self._networks:
            peer = request.remote
            try:
                addr = ipaddress.ip_address(peer or "")
            except ValueError:
                raise ClientNotAllowed("this client may not use the proxy") from None
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            if not any(addr in net for net in self._networks):
                raise ClientNotAllowed("this client may not use the proxy")
        if self._secret is not None:
            given = request.headers.get(self._header, "").encode()
            # Constant time: the comparison must not tell how much of a guess was right.
            if not hmac.compare_digest(given, self._secret):
                raise ClientUnauthenticated(f"missing or wrong {self._header} header")


class _GuardedHandler(RequestHandler):
    """aiohttp's connection handler plus a deadline for the first request's headers.

    aiohttp's keep-alive timer closes connections that sit idle; this closes one whose client
    trickles its first request's headers in slowly (slowloris) after ``header_timeout``.
    """

    header_timeout: float = 15.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._loop.call_later(self.header_timeout, self._header_deadline)

    def _header_deadline(self) -> None:
        # _request_count counts requests whose headers were parsed on this connection.
        if self._request_count == 0 and self.transport is not None:
            self.force_close()
            self.transport.close()


class _BadRequests(logging.Filter):
    """aiohttp logs every malformed request (oversized headers, ambiguous framing, ...) at ERROR
    with a traceback: a client could flood the log that way. Those become one INFO line, event
    ``bad_request``; any other exception keeps its ERROR and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "malformed request refused", ()
            record.exc_info = record.exc_text = None
            record.__dict__.update(event="bad_request", status=exc.code, reason=exc.message[:200])
        return True


#: The logger aiohttp's connection handlers use for the proxy listener.
server_log = logging.getLogger("proxy.http")
server_log.addFilter(_BadRequests())


class GuardedServer(web.Server):
    """``web.Server`` whose connections get a header-read deadline."""

    def __init__(self, handler: Any, *, header_timeout: float, **kwargs: Any) -> None:
        kwargs.setdefault("logger", server_log)
        super().__init__(handler, **kwargs)
        self._handler_class = type(
            "_Handler", (_GuardedHandler,), {"header_timeout": header_timeout}
        )

    def __call__(self) -> RequestHandler:
        return self._handler_class(self, loop=self._loop, **self._kwargs)  # type: ignore[no-any-return]
