"""aiohttp's connection pool against an upstream that closes idle keep-alive connections.

A server may close an idle persistent connection at any moment (RFC 9112 §9.5); a request sent
on it as it closes fails before any byte of the response, and the proxy's pool cannot know in
advance. aiohttp's client retries an idempotent request once, on another pooled connection,
which may be just as stale. The proxy then retries it once more on a new connection; a
request that is not idempotent is never sent twice (RFC 9110 §9.2.2); for it, the pool lets an
idle connection go before the upstream does (``keepalive_timeout``).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.app import Proxy
from tests.conftest import ProxyFactory
from tests.faults.servers import RawRequest, RawServer

TOKEN = "interop-t0k3n"


def static_config(url: str) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "upstreams": [
            {
                "name": "flaky",
                "url": url,
                "max_connections": 32,
                "auth": {"type": "static", "token": TOKEN},
            }
        ],
    }


def answer(request: RawRequest) -> bytes:
    body = f"{request.method} {len(request.body)}".encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    return head if request.method == "HEAD" else head + body


def answer_first_then_drop(answered: list[RawRequest], dropped: list[RawRequest]) -> Any:
    """Answer the first request of each connection with keep-alive (no ``Connection: close``),
    then read the next one and close without a word: what a server does when its idle timeout
    fires as the request arrives."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RawServer
    ) -> None:
        first = await server.next_request(reader)
        answered.append(first)
        writer.write(answer(first))
        await writer.drain()
        dropped.append(await server.next_request(reader))
        writer.close()

    return script


def close_at_random(rng: random.Random, answered: list[RawRequest]) -> Any:
    """After each response (keep-alive, never announcing a close), either close at once, or
    wait a random short idle time for the next request and close if none has arrived; now and
    then read a later request and close without answering it."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RawServer
    ) -> None:
        request = await server.next_request(reader)
        first = True  # a new connection is never closed under its first request
        while True:
            if not first and rng.random() < 0.1:
                return  # the idle timeout fired as the request arrived: no answer
            first = False
            answered.append(request)
            writer.write(answer(request))
            await writer.drain()
            if rng.random() < 0.5:
                return  # closed straight after the response
            try:
                # The server's own idle timeout, a real one: it is what makes the race.
                request = await asyncio.wait_for(server.next_request(reader), rng.uniform(0, 0.003))
            except TimeoutError:
                return

    return script


def retries(proxy: Proxy) -> float | None:
    return proxy.registry.get_sample_value(
        "royalti_proxy_upstream_retries_total", {"upstream": "flaky"}
    )


def target(proxy: Proxy, path: str) -> URL:
    return URL(proxy.addresses["proxy"] + path, encoded=True)


async def two_pooled_connections(proxy: Proxy, http: aiohttp.ClientSession) -> None:
    """Two requests at once: the proxy's pool then holds two connections that will fail."""
    first = await asyncio.gather(
        http.get(target(proxy, "/warm/1")), http.get(target(proxy, "/warm/2"))
    )
    for resp in first:
        assert resp.status == 200
        await resp.read()


async def test_get_on_stale_pooled_connections_is_retried_on_a_new_connection(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    answered: list[RawRequest] = []
    dropped: list[RawRequest] = []
    async with RawServer(answer_first_then_drop(answered, dropped)) as upstream:
        proxy = await start_proxy(static_config(upstream.url))
        await two_pooled_connections(proxy, http)
        assert upstream.connections == 2
        async with http.get(target(proxy, "/after-idle")) as resp:
            body = await resp.read()
            assert resp.status == 200, body
        assert body == b"GET 0"
        # Both pooled connections were tried (aiohttp's own retry), then a new one (ours).
        assert [r.line.split()[1] for r in dropped] == [b"/after-idle", b"/after-idle"]
        assert upstream.connections == 3
        assert answered[-1].line.split()[1] == b"/after-idle"
        assert answered[-1].headers["Authorization"] == f"Bearer {TOKEN}"
        assert proxy.routes[0].stats.stale_retries == 1
        assert retries(proxy) == 1


@pytest.mark.parametrize("method", ["PUT", "DELETE", "OPTIONS", "HEAD"])
async def test_other_idempotent_methods_with_a_buffered_body_are_retried(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession, method: str
) -> None:
    answered: list[RawRequest] = []
    dropped: list[RawRequest] = []
    async with RawServer(answer_first_then_drop(answered, dropped)) as upstream:
        proxy = await start_proxy(static_config(upstream.url))
        await two_pooled_connections(proxy, http)
        data = b"x" * 1000 if method == "PUT" else None
        async with http.request(method, target(proxy, "/thing"), data=data) as resp:
            assert resp.status == 200
            await resp.read()
        assert answered[-1].method == method
        assert answered[-1].body == (data or b"")
        assert proxy.routes[0].stats.stale_retries == 1


async def test_put_with_a_streamed_body_is_retried_when_the_whole_body_was_kept(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A chunked body within ``replay_max_body`` is kept while it is sent: it can be sent again."""
    answered: list[RawRequest] = []
    dropped: list[RawRequest] = []

    async def chunks():
        for i in range(4):
            yield b"%d" % i * 100

    async with RawServer(answer_first_then_drop(answered, dropped)) as upstream:
        proxy = await start_proxy(static_config(upstream.url))
        await two_pooled_connections(proxy, http)
        async with http.put(target(proxy, "/stream"), data=chunks()) as resp:
            assert resp.status == 200
            assert await resp.read() == b"PUT 400"
        assert answered[-1].body == b"0" * 100 + b"1" * 100 + b"2" * 100 + b"3" * 100


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_non_idempotent_request_on_a_stale_connection_is_not_sent_twice(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession, method: str
) -> None:
    answered: list[RawRequest] = []
    dropped: list[RawRequest] = []
    async with RawServer(answer_first_then_drop(answered, dropped)) as upstream:
        proxy = await start_proxy(static_config(upstream.url))
        await two_pooled_connections(proxy, http)
        async with http.request(method, target(proxy, "/once"), data=b"{}") as resp:
            assert resp.status == 502
            assert resp.headers["X-Royalti-Proxy-Error"] == "UPSTREAM_UNAVAILABLE"
        assert [r.method for r in dropped] == [method]
        assert [r.method for r in answered] == ["GET", "GET"]
        assert upstream.connections == 2
        assert retries(proxy) == 0


async def test_retry_goes_to_one_new_connection_only(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """An upstream that drops every request: the proxy gives up after its one retry (502)."""

    async def drop_all(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RawServer
    ) -> None:
        await server.next_request(reader)
        writer.close()

    async with RawServer(drop_all) as upstream:
        proxy = await start_proxy(static_config(upstream.url))
        async with http.get(target(proxy, "/never")) as resp:
            assert resp.status == 502
        # aiohttp's own attempt and retry, then the proxy's one retry.
        assert len(upstream.requests) == 3
        assert proxy.routes[0].stats.stale_retries == 1


async def load(http: aiohttp.ClientSession, url: URL, total: int, width: int) -> list[int]:
    """``total`` GETs, ``width`` at a time; the statuses (0 for a failed request)."""
    statuses: list[int] = []
    todo = iter(range(total))

    async def worker() -> None:
        for i in todo:
            try:
                async with http.get(url / str(i)) as resp:
                    await resp.read()
                    statuses.append(resp.status)
            except aiohttp.ClientError:
                statuses.append(0)

    await asyncio.gather(*(worker() for _ in range(width)))
    return statuses


async def test_no_request_fails_when_the_upstream_closes_keep_alive_connections_under_load(
    start_proxy: ProxyFactory,
) -> None:
    """2,000 GETs over 32 client connections, against an upstream that closes idle
    connections at random: aiohttp's pool alone fails some of them; through the proxy, none."""
    answered: list[RawRequest] = []
    async with RawServer(close_at_random(random.Random(12), answered)) as upstream:
        connector = aiohttp.TCPConnector(limit=32)
        async with aiohttp.ClientSession(connector=connector) as direct:
            alone = await load(direct, URL(upstream.url) / "direct", 500, 32)
        # The scenario is real: the same pool, talking to the upstream itself, does fail.
        assert alone.count(0) > 0

        proxy = await start_proxy(static_config(upstream.url))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as http:
            statuses = await load(http, target(proxy, "/load"), 2000, 32)
        assert statuses.count(200) == 2000, sorted(set(statuses))
        assert proxy.routes[0].stats.stale_retries > 0
        via = [r for r in upstream.requests if r.line.startswith(b"GET /load/")]
        assert {r.headers["Authorization"] for r in via} == {f"Bearer {TOKEN}"}


class LateFin:
    """A TCP relay to ``target`` that passes bytes both ways at once, but the target's closing
    of a connection only ``delay`` seconds later: the time a FIN takes to cross a network.
    Meanwhile the client still takes the connection for open, and a request it sends crosses
    the FIN; on loopback, without the relay, that window is a turn of the event loop."""

    def __init__(self, target: str, delay: float) -> None:
        self._target = URL(target)
        self._delay = delay
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0
        self.url = ""

    async def __aenter__(self) -> LateFin:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        assert self._target.host is not None and self._target.port is not None
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self._target.host, self._target.port
            )
        except BaseException:
            self._tasks.discard(task)
            writer.close()
            raise

        async def to_target() -> None:
            while data := await reader.read(65536):
                # After the target closed, this is lost, as a request that crossed a FIN is.
                up_writer.write(data)

        async def from_target() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
            await asyncio.sleep(self._delay)  # the FIN still on its way

        try:
            pumps = [asyncio.ensure_future(to_target()), asyncio.ensure_future(from_target())]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        except asyncio.CancelledError:
            pass  # cancelled by __aexit__ only
        finally:
            self._tasks.discard(task)
            for w in (writer, up_writer):
                w.close()


async def test_post_after_an_idle_gap_goes_on_a_new_connection_when_the_pool_idles_out_first(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A real aiohttp upstream closes connections idle for 0.2 s, its FIN taking 0.2 s to reach
    the proxy; each POST or PATCH comes 0.3 s after the last response, so it would cross the
    FIN on a pooled connection and fail (not idempotent: never sent twice). The proxy's pool,
    ``keepalive_timeout: 0.1s``, has let the connection go by then and opens a new one.

    Real time passes here on purpose: what is tested is the idle time of aiohttp's
    pool and of aiohttp's server, both measured on the real monotonic clock (3 gaps, about
    1 s in all)."""
    upstream_idle, fin_delay, pool_idle, gap = 0.2, 0.2, 0.1, 0.3
    seen: list[tuple[str, int, str]] = []

    async def record(request: web.Request) -> web.Response:
        await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        assert peer is not None
        seen.append((request.method, peer[1], request.headers["Authorization"]))
        return web.Response(text=request.method)

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", record)
    runner = web.AppRunner(app, keepalive_timeout=upstream_idle, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        async with LateFin(f"http://{host}:{port}", fin_delay) as link:
            data = static_config(link.url)
            data["upstreams"][0]["keepalive_timeout"] = f"{int(pool_idle * 1000)}ms"
            proxy = await start_proxy(data)
            statuses: list[int] = []
            # The first two back to back (within its idle time the pool reuses a connection),
            # then a gap before each of the others.
            for method in ("POST", "POST", "PATCH", "POST", "PATCH"):
                if len(statuses) >= 2:
                    await asyncio.sleep(gap)
                async with http.request(method, target(proxy, "/write"), data=b"{}") as resp:
                    statuses.append(resp.status)
                    await resp.read()
    finally:
        await runner.cleanup()
    assert statuses == [200] * 5
    assert [method for method, _, _ in seen] == ["POST", "POST", "PATCH", "POST", "PATCH"]
    ports = [p for _, p, _ in seen]
    assert ports[0] == ports[1]  # reused
    assert len(set(ports)) == 4 == link.connections  # one new connection after each gap
    assert {auth for _, _, auth in seen} == {f"Bearer {TOKEN}"}
    assert retries(proxy) == 0
