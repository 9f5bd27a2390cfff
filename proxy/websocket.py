"""WebSocket proxying: the credential is injected on the upgrade handshake (Royalti's real-time
updates use Socket.IO over WebSocket), then messages flow both ways until either side closes, and
the close code is passed on to the other side."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Protocol

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from proxy.egress import egress_error
from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.tokens.rejected import replacement
from proxy.tokens.token import Token

if TYPE_CHECKING:
    from proxy.metrics import RouteStats
    from proxy.tokens.manager import TokenManager

log = logging.getLogger("proxy.forward")

#: Handshake headers aiohttp's client writes itself; the client's are not forwarded.
_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
    }
)


class UpgradeRoute(Protocol):
    """What an upgrade needs of its upstream's route (:class:`proxy.forward.Route`). A protocol,
    so that this module never imports the forwarder that calls it."""

    @property
    def name(self) -> str: ...

    @property
    def session(self) -> aiohttp.ClientSession: ...

    @property
    def manager(self) -> TokenManager | None: ...

    @property
    def inject_header(self) -> str: ...

    @property
    def replay_on(self) -> frozenset[int]: ...

    @property
    def egress_proxy(self) -> str | None: ...

    @property
    def stats(self) -> RouteStats: ...

    def credential(self, token: Token) -> str: ...


def is_upgrade(request: web.BaseRequest) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


async def proxy_websocket(
    request: web.BaseRequest,
    route: UpgradeRoute,
    key: str,
    headers: CIMultiDict[str],
    url: URL,
) -> web.StreamResponse:
    """Connect upstream with the credential, accept the client, and relay until one side closes."""
    for name in [n for n in headers if n.lower() in _HANDSHAKE]:
        del headers[name]
    protocols = tuple(
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    )
    manager = route.manager
    token = await manager.get(key) if manager is not None else None
    try:
        upstream = await _connect(route, url, headers, protocols, token)
    except aiohttp.WSServerHandshakeError as exc:
        if token is None or exc.status not in route.replay_on or manager is None:
            return _refused(exc.status)
        # The token was rejected on the handshake: the same single replay as for requests.
        fresh = await replacement(manager, key, token)
        if fresh is None:
            return _refused(exc.status)
        route.stats.replays += 1
        try:
            upstream = await _connect(route, url, headers, protocols, fresh)
        except aiohttp.WSServerHandshakeError as again:
            return _refused(again.status)
    route.stats.record(request.method, 101)
    async with upstream:
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (), autoping=True
        )
        await client.prepare(request)
        await _relay(client, upstream)
        return client


async def _connect(
    route: UpgradeRoute,
    url: URL,
    headers: CIMultiDict[str],
    protocols: tuple[str, ...],
    token: Token | None,
) -> aiohttp.ClientWebSocketResponse:
    if token is not None:
        headers[route.inject_header] = route.credential(token)
    try:
        return await route.session.ws_connect(
            url,
            headers=headers,
            protocols=protocols,
            autoping=True,
            timeout=aiohttp.ClientWSTimeout(ws_close=10.0),
        )
    except aiohttp.WSServerHandshakeError:
        raise
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise UpstreamTimeout(f"upstream {route.name} did not answer the upgrade in time") from exc
    except (aiohttp.ClientProxyConnectionError, aiohttp.ClientHttpProxyError) as exc:
        route.stats.egress_errors += 1
        raise egress_error(route.name, route.egress_proxy, exc) from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(
            f"upstream {route.name} unreachable ({type(exc).__name__})"
        ) from exc


def _refused(status: int) -> web.Response:
    """The upstream refused the upgrade: the client gets its status, without the handshake."""
    return web.Response(status=status if 400 <= status <= 599 else 502)


async def _relay(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    """Pump messages both ways; when one side closes, stop the other pump and close that side
    with the same code."""
    up = asyncio.ensure_future(_pump(client, upstream))
    down = asyncio.ensure_future(_pump(upstream, client))
    try:
        done, _ = await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (up, down):
            task.cancel()
        results = await asyncio.gather(up, down, return_exceptions=True)
    first = up if up in done else down
    code = results[0] if first is up else results[1]
    if not isinstance(code, int):
        code = aiohttp.WSCloseCode.GOING_AWAY  # the pump failed: the connection broke
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse = (
        upstream if first is up else client
    )
    with contextlib.suppress(ConnectionError, aiohttp.ClientError):
        await sink.close(code=code)
    other = client if sink is upstream else upstream
    with contextlib.suppress(ConnectionError, aiohttp.ClientError):
        await other.close(code=code)


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> int:
    """Forward data messages until ``source`` closes; return its close code."""
    while True:
        msg = await source.receive()
        if msg.type is WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            # The code from the frame itself: aiohttp answers the close with a code of its own.
            code = msg.data if isinstance(msg.data, int) else aiohttp.WSCloseCode.OK
            # Passed on at once and shielded: once the close handshake is done the client drops
            # the connection, which cancels this handler.
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                await asyncio.shield(sink.close(code=code))
            return code
        elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return source.close_code or aiohttp.WSCloseCode.GOING_AWAY
