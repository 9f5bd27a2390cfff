"""An upstream that misbehaves, or is merely unusual, through the real proxy.

A response the upstream breaks off reaches the client as an aborted response, never as a
complete-looking one; a slow upstream is a 504 after the read timeout; ``Expect: 100-continue``,
trailers, ``HEAD``, 204/304 and very long header values pass without desynchronising the
connection (checked by sending a second request on the same one). Upstreams here are raw TCP
servers, so every byte and every reset is the test's own choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.app import Proxy
from proxy.errors import ERROR_HEADER
from tests.conftest import WS, ProxyFactory, royalti_config
from tests.faults.conftest import FaultLog, LeakCheck
from tests.faults.servers import (
    RawServer,
    Script,
    abort_with_reset,
    close_quietly,
    open_raw,
    raw_exchange,
    read_response,
    serve_app,
)

STATIC_TOKEN = "static-upstream-credential-3f9a1c"
READ_TIMEOUT = 0.5


def static_config(url: str, **upstream: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "upstreams": [
            {"name": "own", "url": url, "auth": {"type": "static", "token": STATIC_TOKEN}}
            | upstream
        ],
    }


@pytest.fixture
def secrets(leak_check: LeakCheck) -> LeakCheck:
    leak_check.secret(STATIC_TOKEN)
    return leak_check


@pytest.fixture
async def upstream(start_proxy: ProxyFactory) -> AsyncIterator[Any]:
    """``await upstream(script, **upstream_config)``: a raw upstream and the proxy before it."""
    servers: list[RawServer] = []

    async def make(script: Script, **config: Any) -> tuple[RawServer, Proxy]:
        server = await RawServer(script).__aenter__()
        servers.append(server)
        proxy = await start_proxy(static_config(server.url, **config))
        return server, proxy

    yield make
    for server in servers:
        await server.__aexit__(None, None, None)


def errors(proxy: Proxy, code: str) -> float:
    return proxy.registry.get_sample_value("royalti_proxy_errors_total", {"code": code}) or 0.0


# -- a response broken off -----------------------------------------------------------------------


BODY = b"0123456789" * 100

FRAMINGS = {
    "content-length": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\nContent-Length: 100000\r\n\r\n",
        lambda data: data,
    ),
    "chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\n",
        lambda data: b"%x\r\n%s\r\n" % (len(data), data) if data else b"",
    ),
}


@pytest.mark.parametrize("sent", [b"", BODY], ids=["after-headers", "mid-body"])
@pytest.mark.parametrize("framing", sorted(FRAMINGS))
async def test_a_reset_mid_response_reaches_the_client_as_an_aborted_response(
    framing: str,
    sent: bytes,
    upstream: Any,
    http: aiohttp.ClientSession,
    fault_log: FaultLog,
    secrets: LeakCheck,
) -> None:
    head, frame = FRAMINGS[framing]
    relayed = asyncio.Event()  # the client has what was sent: only now is the reset sent

    async def answer_then_reset(reader: Any, writer: Any, server: RawServer) -> None:
        await server.next_request(reader)
        writer.write(head + frame(sent))
        await writer.drain()
        await relayed.wait()
        abort_with_reset(writer)

    _, proxy = await upstream(answer_then_reset)
    async with http.get(proxy.addresses["proxy"] + "/export.csv") as resp:
        assert resp.status == 200
        assert await resp.content.readexactly(len(sent)) == sent
        relayed.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), 5)
    assert [r.error for r in fault_log.events("upstream_aborted")] == ["ClientPayloadError"]


@pytest.mark.parametrize("framing", sorted(FRAMINGS))
async def test_a_reset_mid_response_never_ends_the_clients_framing_cleanly(
    framing: str, upstream: Any, secrets: LeakCheck
) -> None:
    """At the byte level: the client's connection ends before the framing says the body is
    complete (no terminating chunk; fewer bytes than Content-Length)."""
    head, frame = FRAMINGS[framing]
    relayed = asyncio.Event()

    async def answer_then_reset(reader: Any, writer: Any, server: RawServer) -> None:
        await server.next_request(reader)
        writer.write(head + frame(BODY))
        await writer.drain()
        await relayed.wait()
        abort_with_reset(writer)

    _, proxy = await upstream(answer_then_reset)
    reader, writer = await open_raw(proxy.addresses["proxy"])
    try:
        writer.write(b"GET /export.csv HTTP/1.1\r\nHost: p\r\n\r\n")
        head_seen = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).lower()
        assert head_seen.startswith(b"http/1.1 200")
        # The framing still promises more than will come: the client can tell it is cut short.
        promise = b"content-length: 100000" if framing == "content-length" else b"chunked"
        assert promise in head_seen
        first = await asyncio.wait_for(reader.readexactly(len(frame(BODY))), 5)
        assert BODY in first
        relayed.set()
        rest = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                rest += chunk
        assert rest == b""  # not one more byte, and certainly not a terminating "0\r\n\r\n"
        assert reader.at_eof() or reader.exception() is not None
    finally:
        await close_quietly(writer)


# -- slow upstreams --------------------------------------------------------------------------------


async def test_an_upstream_slow_to_send_its_headers_is_a_504_after_the_read_timeout(
    upstream: Any, http: aiohttp.ClientSession, secrets: LeakCheck
) -> None:
    never = asyncio.Event()

    async def stall(reader: Any, writer: Any, server: RawServer) -> None:
        await server.next_request(reader)
        await never.wait()

    server, proxy = await upstream(stall, timeouts={"read": READ_TIMEOUT})
    start = time.monotonic()
    async with http.get(proxy.addresses["proxy"] + "/slow") as resp:
        body = await resp.read()
        elapsed = time.monotonic() - start
    secrets.place("504 body", body)
    assert resp.status == 504
    assert resp.headers[ERROR_HEADER] == "UPSTREAM_TIMEOUT"
    assert json.loads(body)["error"]["code"] == "UPSTREAM_TIMEOUT"
    # Real time: the proxy's own 0.5 s read timeout is what is under test.
    assert READ_TIMEOUT * 0.9 <= elapsed < READ_TIMEOUT + 0.5
    assert errors(proxy, "UPSTREAM_TIMEOUT") == 1
    assert len(server.requests) == 1


async def test_an_upstream_that_stalls_mid_body_past_the_read_timeout_aborts_the_response(
    upstream: Any, http: aiohttp.ClientSession, fault_log: FaultLog, secrets: LeakCheck
) -> None:
    never = asyncio.Event()

    async def stall_mid_body(reader: Any, writer: Any, server: RawServer) -> None:
        await server.next_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + BODY)
        await writer.drain()
        await never.wait()

    _, proxy = await upstream(stall_mid_body, timeouts={"read": READ_TIMEOUT})
    start = time.monotonic()
    async with http.get(proxy.addresses["proxy"] + "/slow") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert time.monotonic() - start < READ_TIMEOUT + 0.5
    assert len(fault_log.events("upstream_aborted")) == 1


# -- Expect: 100-continue ------------------------------------------------------------------------


@pytest.fixture
async def royalti_proxy(start_proxy: ProxyFactory, issuing_fake: Any, fake_api_url: str) -> Proxy:
    """The proxy before the fake Royalti API, ``ws-gamma`` not allowed."""
    return await start_proxy(
        royalti_config(fake_api_url, default_workspace=WS[0], allowed_workspaces=[WS[0], "ws-beta"])
    )


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (b"Content-Length: 11\r\n", b"hello world"),
        (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    ],
    ids=["content-length", "chunked"],
)
async def test_expect_100_continue_gets_100_continue_then_the_body_then_the_answer(
    framing: bytes, body: bytes, royalti_proxy: Proxy, issuing_fake: Any, leak_check: LeakCheck
) -> None:
    reader, writer = await open_raw(royalti_proxy.addresses["proxy"])
    try:
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\n" + framing + b"\r\n"
        )
        await writer.drain()
        # Nothing of the body has been sent: the proxy must say "go on" first, at once.
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1.0)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        final = await asyncio.wait_for(read_response(reader), 5)
    finally:
        await close_quietly(writer)
    assert final.status == 200
    echoed = json.loads(final.body)
    assert echoed["body_len"] == 11
    assert echoed["body_sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert "expect" not in {name.lower() for name, _ in echoed["headers"]}


async def test_expect_100_continue_for_a_refused_workspace_gets_the_refusal_not_100_continue(
    royalti_proxy: Proxy, issuing_fake: Any, leak_check: LeakCheck
) -> None:
    response = await raw_exchange(
        royalti_proxy.addresses["proxy"],
        b"POST /echo HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\n"
        b"X-Royalti-Workspace: ws-gamma\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
    )
    leak_check.place("403 body", response.body)
    assert response.status == 403
    assert response.headers[ERROR_HEADER] == "WORKSPACE_NOT_ALLOWED"
    assert issuing_fake.api_calls == 0


# -- trailers --------------------------------------------------------------------------------------


async def test_a_chunked_request_with_trailers_arrives_intact_and_the_connection_stays_usable(
    royalti_proxy: Proxy, issuing_fake: Any, leak_check: LeakCheck
) -> None:
    reader, writer = await open_raw(royalti_proxy.addresses["proxy"])
    try:
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n"
            b"Trailer: X-Checksum\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 5eb63bbb\r\n\r\n"
        )
        first = await asyncio.wait_for(read_response(reader), 5)
        writer.write(b"GET /user/ HTTP/1.1\r\nHost: p\r\n\r\n")
        second = await asyncio.wait_for(read_response(reader), 5)
    finally:
        await close_quietly(writer)
    assert first.status == 200
    echoed = json.loads(first.body)
    assert echoed["body_len"] == 11
    assert echoed["body_sha256"] == hashlib.sha256(b"hello world").hexdigest()
    names = {name.lower() for name, _ in echoed["headers"]}
    assert names.isdisjoint({"trailer", "x-checksum", "te"})
    assert second.status == 200
    assert json.loads(second.body)["success"] is True


async def test_a_chunked_response_with_trailers_arrives_intact_and_the_connection_stays_usable(
    upstream: Any, secrets: LeakCheck
) -> None:
    async def chunked_with_trailers(reader: Any, writer: Any, server: RawServer) -> None:
        while True:
            request = await server.next_request(reader)
            if request.line.startswith(b"GET /trailers"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Digest\r\n\r\n"
                    b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Digest: sha-256=abc\r\n\r\n"
                )
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
            await writer.drain()

    _, proxy = await upstream(chunked_with_trailers)
    reader, writer = await open_raw(proxy.addresses["proxy"])
    try:
        writer.write(b"GET /trailers HTTP/1.1\r\nHost: p\r\n\r\n")
        first = await asyncio.wait_for(read_response(reader), 5)
        writer.write(b"GET /next HTTP/1.1\r\nHost: p\r\n\r\n")
        second = await asyncio.wait_for(read_response(reader), 5)
    finally:
        await close_quietly(writer)
    assert (first.status, first.body) == (200, b"hello world")
    assert "Trailer" not in first.headers
    assert (second.status, second.body) == (200, b"next")


# -- responses without a body ------------------------------------------------------------------


HEAD_ANSWERS = {
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\nContent-Length: 12345\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\n",
}


@pytest.mark.parametrize("answer", sorted(HEAD_ANSWERS))
async def test_head_gets_no_body_its_content_length_and_a_usable_connection(
    answer: str, upstream: Any, secrets: LeakCheck
) -> None:
    async def head_then_get(reader: Any, writer: Any, server: RawServer) -> None:
        while True:
            request = await server.next_request(reader)
            if request.method == "HEAD":
                writer.write(HEAD_ANSWERS[answer])
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
            await writer.drain()

    server, proxy = await upstream(head_then_get)
    reader, writer = await open_raw(proxy.addresses["proxy"])
    try:
        writer.write(b"HEAD /export.csv HTTP/1.1\r\nHost: p\r\n\r\n")
        head = await asyncio.wait_for(read_response(reader, head=True), 5)
        writer.write(b"GET /next HTTP/1.1\r\nHost: p\r\n\r\n")
        second = await asyncio.wait_for(read_response(reader), 5)
    finally:
        await close_quietly(writer)
    assert head.status == 200
    assert head.body == b""
    assert head.headers["Content-Type"] == "text/csv"
    if answer == "content-length":
        assert head.headers["Content-Length"] == "12345"
    assert (second.status, second.body) == (200, b"next")
    assert [r.method for r in server.requests] == ["HEAD", "GET"]


EMPTY_ANSWERS = {
    "204": b"HTTP/1.1 204 No Content\r\nX-Id: 7\r\n\r\n",
    "304": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 500\r\n\r\n',
}


@pytest.mark.parametrize("status", sorted(EMPTY_ANSWERS))
async def test_204_and_304_are_relayed_without_a_body_and_the_connection_stays_usable(
    status: str, upstream: Any, secrets: LeakCheck
) -> None:
    async def empty_then_next(reader: Any, writer: Any, server: RawServer) -> None:
        while True:
            request = await server.next_request(reader)
            if request.line.startswith(b"GET /empty"):
                writer.write(EMPTY_ANSWERS[status])
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
            await writer.drain()

    _, proxy = await upstream(empty_then_next)
    reader, writer = await open_raw(proxy.addresses["proxy"])
    try:
        writer.write(b'GET /empty HTTP/1.1\r\nHost: p\r\nIf-None-Match: "v1"\r\n\r\n')
        first = await asyncio.wait_for(read_response(reader), 5)
        writer.write(b"GET /next HTTP/1.1\r\nHost: p\r\n\r\n")
        second = await asyncio.wait_for(read_response(reader), 5)
    finally:
        await close_quietly(writer)
    assert (first.status, first.body) == (int(status), b"")
    assert "Transfer-Encoding" not in first.headers
    if status == "304":
        assert first.headers["ETag"] == '"v1"'
    else:
        assert first.headers["X-Id"] == "7"
    assert (second.status, second.body) == (200, b"next")


# -- very long header values -------------------------------------------------------------------


LONG = "v" * 7 * 1024
"""7 KiB: long, but under the proxy's default 8190-byte header line limit."""


async def test_a_7_kib_request_header_value_reaches_the_upstream_intact(
    royalti_proxy: Proxy, issuing_fake: Any, http: aiohttp.ClientSession, leak_check: LeakCheck
) -> None:
    async with http.post(
        royalti_proxy.addresses["proxy"] + "/echo", headers={"X-Long": LONG}, data=b"x"
    ) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    assert [v for k, v in echoed["headers"] if k.lower() == "x-long"] == [LONG]


async def test_a_7_kib_response_header_value_reaches_the_client_intact(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession, secrets: LeakCheck
) -> None:
    async def long_header(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"X-Long": LONG})

    app = web.Application()
    app.router.add_get("/long", long_header)
    runner, url = await serve_app(app)
    try:
        proxy = await start_proxy(static_config(url))
        async with http.get(proxy.addresses["proxy"] + "/long") as resp:
            assert resp.status == 200
            assert resp.headers.getall("X-Long") == [LONG]
            assert await resp.read() == b"ok"
    finally:
        await runner.cleanup()


async def test_a_request_header_over_the_limit_is_a_400_and_never_reaches_the_upstream(
    royalti_proxy: Proxy, issuing_fake: Any, leak_check: LeakCheck
) -> None:
    response = await raw_exchange(
        royalti_proxy.addresses["proxy"],
        b"GET /user/ HTTP/1.1\r\nHost: p\r\nX-Long: "
        + b"v" * 9000
        + b"\r\nConnection: close\r\n\r\n",
    )
    leak_check.place("400 body", response.body)
    assert response.status == 400
    assert issuing_fake.api_calls == 0


async def test_a_response_header_over_the_limit_is_a_502_and_the_proxy_keeps_serving(
    upstream: Any, http: aiohttp.ClientSession, secrets: LeakCheck
) -> None:
    async def oversized_then_fine(reader: Any, writer: Any, server: RawServer) -> None:
        request = await server.next_request(reader)
        if request.line.startswith(b"GET /huge-header"):
            writer.write(
                b"HTTP/1.1 200 OK\r\nX-Long: " + b"v" * 9000 + b"\r\nContent-Length: 0\r\n\r\n"
            )
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nfine")
        await writer.drain()

    _, proxy = await upstream(oversized_then_fine)
    base = URL(proxy.addresses["proxy"])
    async with http.get(base / "huge-header") as resp:
        body = await resp.read()
    secrets.place("502 body", body)
    assert resp.status == 502
    assert resp.headers[ERROR_HEADER] == "UPSTREAM_UNAVAILABLE"
    async with http.get(base / "next") as resp:
        assert (resp.status, await resp.read()) == (200, b"fine")


# -- request smuggling -------------------------------------------------------------------------


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: p\r\n\r\n"


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % (5 + len(SMUGGLED)),
        b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % (5 + len(SMUGGLED)),
        b"Content-Length: 0\r\nContent-Length: %d\r\n" % (5 + len(SMUGGLED)),
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        b"Transfer-Encoding: xchunked\r\n",
        b"Transfer-Encoding : chunked\r\n",
    ],
    ids=["cl-te", "te-cl", "cl-cl", "te-te", "te-obfuscated", "te-space"],
)
async def test_ambiguous_request_framing_never_smuggles_a_second_request_upstream(
    head: bytes, upstream: Any, secrets: LeakCheck
) -> None:
    async def answer_all(reader: Any, writer: Any, server: RawServer) -> None:
        while True:
            await server.next_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    server, proxy = await upstream(answer_all)
    response = await raw_exchange(
        proxy.addresses["proxy"],
        b"POST /a HTTP/1.1\r\nHost: p\r\n" + head + b"\r\n0\r\n\r\n" + SMUGGLED,
    )
    # Refused outright (RFC 9112 §6.3: such a message is unrecoverable), before any byte of it
    # went upstream.
    assert response.status == 400
    assert server.requests == []


async def test_an_upstream_response_with_ambiguous_framing_is_a_502_not_two_responses(
    upstream: Any, http: aiohttp.ClientSession, secrets: LeakCheck
) -> None:
    async def ambiguous(reader: Any, writer: Any, server: RawServer) -> None:
        await server.next_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
        )
        await writer.drain()

    _, proxy = await upstream(ambiguous)
    async with http.get(proxy.addresses["proxy"] + "/x") as resp:
        body = await resp.read()
    secrets.place("502 body", body)
    assert resp.status == 502
    assert resp.headers[ERROR_HEADER] == "UPSTREAM_UNAVAILABLE"
    assert b"evil" not in body


async def test_expect_100_continue_while_no_token_can_be_had_gets_the_503_first(
    start_proxy: ProxyFactory, issuing_fake: Any, fake_api_url: str, leak_check: LeakCheck
) -> None:
    issuing_fake.authtoken_failures = [(500, None)] * 100
    proxy = await start_proxy(royalti_config(fake_api_url, default_workspace=WS[0]))
    await proxy.managers["royalti"].wait_idle()  # the start-up fetch failed: backing off now
    reader, writer = await open_raw(proxy.addresses["proxy"])
    try:
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\n"
            b"Content-Length: 1000\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        # curl waits 1 s for an interim or final answer before it sends the body anyway.
        first = await asyncio.wait_for(reader.readline(), 1.0)
    finally:
        await close_quietly(writer)
    assert first.startswith(b"HTTP/1.1 503")
