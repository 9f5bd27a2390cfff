"""The leaner client path (proxy/direct.py): used for the proxy's own sessions and nothing
else, and sending exactly the bytes ``ClientSession.request`` sends, retry included."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.direct import can_send_directly, send_directly
from proxy.sending import ExactHeadersRequest, fresh_session
from tests.conftest import ProxyFactory, royalti_config

TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5, sock_read=5)
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Up: 1\r\n\r\nok"


def _proxy_session(**kw: object) -> aiohttp.ClientSession:
    """A session built as proxy/upstreams.py builds a route's."""
    options: dict[str, object] = {
        "connector": aiohttp.TCPConnector(limit=10),
        "auto_decompress": False,
        "request_class": ExactHeadersRequest,
        "cookie_jar": aiohttp.DummyCookieJar(),
    }
    options.update(kw)
    return aiohttp.ClientSession(**options)  # type: ignore[arg-type]


class Capture:
    """A raw HTTP/1.1 server on loopback: records every request's bytes and answers RESPONSE.
    With ``stale``, its first connection answers one request and then closes on the next
    without answering: a pooled connection the upstream dropped while it sat idle."""

    def __init__(self, *, stale: bool = False) -> None:
        self.requests: list[bytes] = []
        self.connections = 0
        self.stale = stale
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        sock: socket.socket = self.server.sockets[0]
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first_connection = self.connections == 1
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                if self.stale and first_connection and answered == 1:
                    break
                writer.write(RESPONSE)
                await writer.drain()
                answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def capture() -> AsyncIterator[Capture]:
    cap = Capture()
    yield cap
    await cap.close()


async def test_the_proxys_sessions_take_the_direct_path_and_any_other_session_does_not() -> None:
    plain = _proxy_session()
    fresh = fresh_session(limit=10, tls=True)
    others = [
        _proxy_session(proxy="http://127.0.0.1:3128"),  # an egress proxy
        _proxy_session(trace_configs=[aiohttp.TraceConfig()]),
        _proxy_session(cookie_jar=aiohttp.CookieJar()),
        _proxy_session(headers={"X-Default": "1"}),
        _proxy_session(raise_for_status=True),
        _proxy_session(request_class=aiohttp.ClientRequest),
    ]
    try:
        assert can_send_directly(plain, TIMEOUT)
        assert can_send_directly(fresh, TIMEOUT)
        # An overall deadline is a timer _request arms, which the direct path would not.
        assert not can_send_directly(plain, aiohttp.ClientTimeout(total=30))
        assert [can_send_directly(s, TIMEOUT) for s in others] == [False] * len(others)
    finally:
        for s in (plain, fresh, *others):
            await s.close()


async def test_a_running_proxy_routes_directly_and_an_egress_route_through_aiohttp(
    start_proxy: ProxyFactory, fake_url: str
) -> None:
    direct = await start_proxy(royalti_config(fake_url))
    assert direct.routes[0].direct
    data = royalti_config(fake_url)
    data["upstreams"][0]["egress"] = {"proxy": "http://127.0.0.1:9"}
    data["upstreams"][0]["token_egress"] = {"proxy": "none"}
    egress = await start_proxy(data)
    assert not egress.routes[0].direct


@pytest.mark.parametrize(
    ("method", "body"),
    [("GET", None), ("POST", b'{"a": 1}'), ("PUT", b"x" * 70_000), ("DELETE", None)],
)
async def test_the_upstream_receives_the_same_bytes_as_from_session_request(
    capture: Capture, method: str, body: bytes | None
) -> None:
    url = URL(await capture.start() + "/v1/items?q=1&q=2", encoded=True)
    headers = CIMultiDict([("Accept", "*/*"), ("X-Two", "a"), ("X-Two", "b")])
    async with _proxy_session() as session:
        resp = await send_directly(session, TIMEOUT, method, url, CIMultiDict(headers), body)
        direct = (resp.status, dict(resp.headers), await resp.read())
        resp.release()
        resp = await session.request(
            method,
            url,
            headers=CIMultiDict(headers),
            data=body,
            allow_redirects=False,
            timeout=TIMEOUT,
        )
        via_aiohttp = (resp.status, dict(resp.headers), await resp.read())
        resp.release()
    assert direct == via_aiohttp == (200, {"Content-Length": "2", "X-Up": "1"}, b"ok")
    assert len(capture.requests) == 2
    assert capture.requests[0] == capture.requests[1]
    assert capture.requests[0].startswith(f"{method} /v1/items?q=1&q=2 HTTP/1.1\r\n".encode())
    assert capture.connections == 1  # the same pooled connection, as aiohttp's path


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_stale_pooled_connection_is_retried_once_when_idempotent_as_aiohttp_does(
    method: str,
) -> None:
    cap = Capture(stale=True)
    url = URL(await cap.start() + "/x", encoded=True)
    try:
        async with _proxy_session() as session:
            first = await send_directly(session, TIMEOUT, method, url, CIMultiDict(), b"1")
            assert await first.read() == b"ok"
            first.release()
            if method == "GET":
                # Idempotent: aiohttp's one retry, on a new connection, answers it.
                again = await send_directly(session, TIMEOUT, method, url, CIMultiDict(), b"2")
                assert again.status == 200
                again.release()
                assert (cap.connections, len(cap.requests)) == (2, 3)
                assert cap.requests[1] == cap.requests[2]  # the same body, sent again whole
            else:
                with pytest.raises(aiohttp.ServerDisconnectedError):
                    await send_directly(session, TIMEOUT, method, url, CIMultiDict(), b"2")
                assert (cap.connections, len(cap.requests)) == (1, 2)
    finally:
        await cap.close()


async def test_a_closed_session_and_an_unreachable_upstream_fail_as_aiohttp_fails() -> None:
    session = _proxy_session()
    await session.close()
    with pytest.raises(RuntimeError, match="Session is closed"):
        await send_directly(
            session, TIMEOUT, "GET", URL("http://127.0.0.1:9/"), CIMultiDict(), None
        )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    async with _proxy_session() as session:
        with pytest.raises(aiohttp.ClientConnectorError):
            await send_directly(
                session, TIMEOUT, "GET", URL(f"http://127.0.0.1:{port}/"), CIMultiDict(), None
            )
