"""Who may call the proxy, and how much a client may ask of it.

A process that adds an account's credentials to whatever it is sent must be reachable only by its
app. By default it listens on loopback; on any other address it refuses to start unless an
inbound guard is configured: ``inbound.allowed_cidrs``, a shared secret header, or a Unix socket
(``inbound.allow_unauthenticated: true`` overrides, loudly).

The listener's connections are aiohttp's, with two changes (:class:`GuardedServer`): a deadline
for the first request's headers (slowloris), and every answer aiohttp's HTTP layer gives by
itself (a request its parser refuses, a handler that failed) in the proxy's JSON error envelope.
What an attack costs is bounded too: one DEBUG line per refused request or cut connection, and at
most one INFO line per minute and kind (:class:`Notices`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http import HttpProcessingError
from multidict import CIMultiDict

from proxy.errors import (
    ERROR_HEADER,
    ClientNotAllowed,
    ClientUnauthenticated,
    InternalError,
    MalformedRequest,
    ProxyError,
)

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


#: The logger of the proxy listener's connections (aiohttp's handlers log to it too).
server_log = logging.getLogger("proxy.http")


class Notices:
    """One kind of attack noise: a DEBUG line each time, and at most one INFO line per
    ``interval``, the first of a burst at once, with ``count``: how many happened since the
    previous INFO line, this one included. An attacker cannot flood the log, an operator
    still sees that it happens and how often; no timer is involved."""

    __slots__ = ("_count", "_event", "_interval", "_message", "_next", "_now")

    def __init__(
        self,
        event: str,
        message: str,
        *,
        interval: float = 60.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._event = event
        self._message = message
        self._interval = interval
        self._now = now
        self._next = float("-inf")
        self._count = 0

    def note(self, **fields: object) -> None:
        self._count += 1
        now = self._now()
        if now >= self._next:
            self._next = now + self._interval
            count, self._count = self._count, 0
            server_log.info(self._message, extra={"event": self._event, "count": count, **fields})
        elif server_log.isEnabledFor(logging.DEBUG):
            server_log.debug(self._message, extra={"event": self._event, **fields})


#: Where the request's own bytes begin in a parser message: after a colon (``... reading:
#: b'...'``, llhttp's ``reason:\n\n  b'...'``) or at a quote (``Bad status line 'GARBAGE'``).
_QUOTED = re.compile(r":|\s(?:b|bytearray\()?['\"]")


def _reason(exc: HttpProcessingError) -> str:
    """What aiohttp's parser found wrong, without the request bytes its messages quote: they
    may hold a header value, the inbound shared secret among them. Goes to the log and to
    the client."""
    text = (exc.message or "").strip()
    first = _QUOTED.split(text.splitlines()[0] if text else "", maxsplit=1)[0].strip()
    return first[:120] or type(exc).__name__


class _EnvelopeOnHTTP11(web.StreamResponse):
    """The answer to a request aiohttp's parser refused.

    aiohttp hands the error path a placeholder request whose version is HTTP/1.0, so a
    ``web.Response`` would go out with an ``HTTP/1.0`` status line. The real request's version
    is unknown (its request line may be what was wrong); the proxy speaks HTTP/1.1, so the head
    is written as such, through the stream writer's public ``write_headers``/``write_eof``."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(status=error.status)
        self._error = error
        self.force_close()

    async def prepare(self, request: web.BaseRequest) -> Any:
        body = self._error.body()
        status = HTTPStatus(self._error.status)
        headers = CIMultiDict(
            {
                "Content-Type": "application/json",
                "Content-Length": str(len(body)),
                ERROR_HEADER: self._error.code,
                "Date": formatdate(usegmt=True),
                "Connection": "close",
            }
        )
        writer = request.writer
        await writer.write_headers(f"HTTP/1.1 {status.value} {status.phrase}", headers)
        await writer.write_eof(body)
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        return  # prepare() wrote all of it


def _peer(handler: web.RequestHandler) -> str:
    peer = handler.peername
    return str(peer[0]) if isinstance(peer, tuple | list) and peer else str(peer or "")


class _GuardedHandler(web.RequestHandler):
    """aiohttp's connection handler plus a deadline for the first request's headers, and the
    proxy's envelope on the answers aiohttp gives by itself.

    aiohttp's keep-alive timer closes connections that sit idle; this closes one whose client
    trickles its first request's headers in slowly (slowloris) after ``header_timeout``.
    """

    # Set per server by GuardedServer (a subclass each).
    header_timeout: float = 15.0
    cuts: Notices
    refusals: Notices

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._deadline = asyncio.get_running_loop().call_later(
            self.header_timeout, self._header_deadline
        )

    def connection_lost(self, exc: BaseException | None) -> None:
        # Cancelled, not left to lapse: a pending timer would keep this closed connection's
        # handler alive until it fired (15 s of memory per connection under a flood).
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def _header_deadline(self) -> None:
        self._deadline = None
        # aiohttp counts a request when its parser has its headers (or refused them): one that
        # got this far is the keep-alive timer's and the handler's to look after.
        if self._request_count:
            return
        peer = _peer(self)
        # Closes the transport as well; connection_lost follows as for any closed connection.
        self.force_close()
        self.cuts.note(peer=peer, header_timeout=self.header_timeout)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's error path (a request its parser refused, a handler that raised), answered
        in the envelope with ``X-Royalti-Proxy-Error`` and ``Connection: close``."""
        if isinstance(exc, HttpProcessingError):
            reason = _reason(exc)
            self.refusals.note(
                peer=_peer(self), status=status, reason=reason, error=type(exc).__name__
            )
            return _EnvelopeOnHTTP11(MalformedRequest(f"malformed request: {reason}"))
        # Anything else is a request the proxy failed to handle: a bug, logged with its
        # traceback (a handler that timed out comes without an exception: aiohttp's 504).
        if exc is not None:
            self.log_exception("unhandled exception while handling a request", exc_info=exc)
        if request.writer.output_size > 0:
            # As aiohttp does: the response has begun, only closing the connection tells.
            raise ConnectionError("the response has begun: it cannot become an error response")
        error = InternalError("the proxy failed to handle this request")
        resp = web.Response(
            status=status,
            body=error.body(),
            headers={ERROR_HEADER: error.code, "Content-Type": "application/json"},
        )
        resp.force_close()
        return resp


#: What the guarded handler relies on in aiohttp's ``RequestHandler`` beyond its public API:
#: the number of requests whose headers were parsed on a connection. Without it (an aiohttp that
#: renamed it) the header deadline is not armed, with a warning; aiohttp's keep-alive timer still
#: closes a connection that never sends a whole request, at ``limits.idle_timeout``.
HANDLER_PRIVATE = ("_request_count",)


class GuardedServer(web.Server):
    """``web.Server`` whose connections get a header-read deadline and whose HTTP-layer
    answers use the envelope."""

    def __init__(
        self,
        handler: Any,
        *,
        header_timeout: float,
        loop: asyncio.AbstractEventLoop | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("logger", server_log)
        # Kept here rather than read back from web.Server's private _kwargs/_loop: aiohttp's
        # own __call__ builds its RequestHandler from those; this one builds ours from these.
        self._handler_kwargs = {
            k: v for k, v in kwargs.items() if k not in ("request_factory", "handler_cancellation")
        }
        self._handler_loop = loop or asyncio.get_running_loop()
        super().__init__(handler, loop=self._handler_loop, **kwargs)
        attrs: dict[str, Any] = {
            "header_timeout": header_timeout,
            "cuts": Notices("header_timeout", "connection closed: request headers too slow"),
            "refusals": Notices("bad_request", "malformed request refused"),
        }
        if not all(hasattr(web.RequestHandler, name) for name in HANDLER_PRIVATE):
            server_log.warning(
                "this aiohttp's request handler differs from the one expected; "
                "limits.header_timeout is not enforced",
                extra={"event": "header_timeout_fallback"},
            )
            attrs["connection_made"] = web.RequestHandler.connection_made
        self._handler_class: type[_GuardedHandler] = type("_Handler", (_GuardedHandler,), attrs)

    def __call__(self) -> web.RequestHandler:
        return self._handler_class(self, loop=self._handler_loop, **self._handler_kwargs)
