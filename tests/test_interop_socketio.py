"""python-socketio through the proxy: Royalti's real-time updates are Socket.IO on the API host.

The upstream is python-socketio's own ``AsyncServer`` attached to an aiohttp application, the
client python-socketio's own ``AsyncClient``; neither was written here. Every HTTP request
and WebSocket handshake the upstream sees must carry the injected credential, and the client
never has one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import socketio
from aiohttp import web

from tests.conftest import ProxyFactory, Serve

TOKEN = "sock3t-t0k3n"


def static_config(url: str) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "upstreams": [{"name": "rt", "url": url, "auth": {"type": "static", "token": TOKEN}}],
    }


class Upstream:
    """A Socket.IO server that echoes ``ping`` as ``pong``, answers ``add`` with an ack, and
    records the credential of every HTTP request (polls and handshakes) it receives."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        self.connect_auth: list[str | None] = []
        self.got: list[Any] = []
        # python-socketio's client, on polling, waits for its pending long poll at disconnect:
        # up to ping_interval + ping_timeout (25 s + 20 s by default), with or without a proxy.
        self.sio = socketio.AsyncServer(async_mode="aiohttp", ping_interval=1, ping_timeout=2)
        self.app = web.Application(middlewares=[self._record])
        self.sio.attach(self.app)
        self.sio.on("connect", self._connect)
        self.sio.on("ping", self._ping)
        self.sio.on("add", self._add)

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        transport = request.query.get("transport", "")
        self.seen.append((request.method, transport, request.headers.get("Authorization")))
        return await handler(request)

    async def _connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        self.connect_auth.append(environ.get("HTTP_AUTHORIZATION"))
        await self.sio.emit("welcome", {"sid": sid}, to=sid)

    async def _ping(self, sid: str, data: Any) -> None:
        self.got.append(data)
        await self.sio.emit("pong", {"echo": data}, to=sid)

    async def _add(self, sid: str, a: int, b: int) -> int:
        return a + b


@pytest.mark.parametrize(
    "transports",
    [["polling"], ["websocket"], ["polling", "websocket"]],
    ids=["polling", "websocket", "polling-then-upgrade"],
)
async def test_socketio_events_flow_both_ways_with_the_credential_injected(
    start_proxy: ProxyFactory, serve: Serve, transports: list[str]
) -> None:
    upstream = Upstream()
    url = await serve(upstream.app)
    proxy = await start_proxy(static_config(url))
    client = socketio.AsyncClient(reconnection=False)
    welcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    pongs: asyncio.Queue[Any] = asyncio.Queue()
    client.on("welcome", lambda data: welcome.set_result(data))
    client.on("pong", pongs.put_nowait)
    try:
        await client.connect(proxy.addresses["proxy"], transports=transports, wait_timeout=5)
        assert (await asyncio.wait_for(welcome, 5))["sid"]
        for i in range(10):  # one at a time, each answered before the next
            await client.emit("ping", {"n": i, "blob": "x" * 1000 * i})
            assert await asyncio.wait_for(pongs.get(), 5) == {
                "echo": {"n": i, "blob": "x" * 1000 * i}
            }
        # A burst: on polling the client sends these in one POST. Not more than 16: an
        # engine.io server refuses a larger batch ("Too many packets in payload"), proxy or
        # not (docs/faults.md).
        for i in range(10, 20):
            await client.emit("ping", {"n": i, "blob": "x" * 1000 * i})
        for i in range(10, 20):
            assert await asyncio.wait_for(pongs.get(), 5) == {
                "echo": {"n": i, "blob": "x" * 1000 * i}
            }
        assert await client.call("add", (40, 2), timeout=5) == 42
        if "websocket" in transports:
            assert client.transport() == "websocket"
        else:
            assert client.transport() == "polling"
    finally:
        await client.disconnect()
    assert [d["n"] for d in upstream.got] == list(range(20))
    assert upstream.connect_auth == [f"Bearer {TOKEN}"]
    # Every poll (GET and POST) and every handshake reached the upstream with the credential.
    assert upstream.seen
    assert {auth for _, _, auth in upstream.seen} == {f"Bearer {TOKEN}"}
    used = {transport for _, transport, _ in upstream.seen}
    assert used == set(transports)
    if transports == ["polling"]:
        assert {method for method, _, _ in upstream.seen} == {"GET", "POST"}
