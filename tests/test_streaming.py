"""Bodies stream through the proxy: large uploads and downloads in bounded memory, Server-Sent
Events one at a time, cancellation when the client goes away, compressed bytes untouched."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import random
import resource
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.app import Proxy
from proxy.fakes.royalti import FakeRoyalti, csv_bytes
from tests.conftest import WS, ProxyFactory, Serve, royalti_config

MiB = 1024 * 1024
BIG = 200 * MiB
MEMORY_BOUND = 64 * MiB
STATIC_TOKEN = "t0k3n"


def static_config(url: str) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "upstreams": [
            {"name": "own", "url": url, "auth": {"type": "static", "token": STATIC_TOKEN}}
        ],
    }


def target(proxy: Proxy, path: str) -> URL:
    return URL(proxy.addresses["proxy"] + path, encoded=True)


# -- large bodies in bounded memory -----------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux >= 4.0, ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    """The process's peak resident set size so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


async def file_chunks(size: int, digest: Any) -> AsyncIterator[bytes]:
    """``size`` bytes of incompressible content, 64 KiB at a time, hashed as they go."""
    block = random.Random(1).randbytes(64 * 1024)
    for index, offset in enumerate(range(0, size, len(block))):
        chunk = index.to_bytes(8, "big") + block[8 : min(len(block), size - offset)]
        digest.update(chunk)
        yield chunk


async def multipart(boundary: str, filename: str, size: int, digest: Any) -> AsyncIterator[bytes]:
    """A one-file ``multipart/form-data`` body, generated as it is sent."""
    yield (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()
    async for chunk in file_chunks(size, digest):
        yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


async def test_200_mb_upload_and_download_stream_through_in_bounded_memory(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    # Memory is the kernel's peak RSS of this one process (client, proxy and fake together),
    # reset just before the transfers: tracemalloc makes the fake's CSV generation ~9x slower
    # and does not see buffers allocated outside Python's allocator.
    expected = hashlib.sha256()
    for chunk in csv_bytes(BIG):
        expected.update(chunk)
    proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
    exact = reset_peak_rss()
    before = peak_rss()

    sent = hashlib.sha256()
    boundary = "royalti-proxy-test-" + hashlib.sha256(b"boundary").hexdigest()[:24]
    async with http.post(
        target(proxy, "/file/royalty"),
        data=multipart(boundary, "statement.csv", BIG, sent),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    ) as resp:
        assert resp.status == 200, await resp.text()
        (uploaded,) = (await resp.json())["files"]
    assert uploaded["filename"] == "statement.csv"
    assert uploaded["size"] == BIG
    assert uploaded["sha256"] == sent.hexdigest()

    received = hashlib.sha256()
    size = 0
    async with http.get(target(proxy, f"/file/1/download?size={BIG}")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(BIG)
        async for chunk in resp.content.iter_chunked(256 * 1024):
            received.update(chunk)
            size += len(chunk)
    assert size == BIG
    assert received.hexdigest() == expected.hexdigest()

    growth = peak_rss() - before
    print(f"peak RSS growth over 2 x 200 MB: {growth / MiB:.1f} MiB (exact reset: {exact})")
    assert growth < MEMORY_BOUND


# -- Server-Sent Events -----------------------------------------------------------------------


async def test_server_sent_events_are_relayed_one_by_one_as_they_are_produced(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    gate: asyncio.Queue[None] = asyncio.Queue()
    fake.sse_gate = gate
    proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))

    async with http.post(target(proxy, "/ai/chat?n=3")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        buffer = b""
        for index in range(3):
            # Until the gate opens the fake cannot write event `index`: if it arrives now, the
            # proxy passed it on by itself, not buffered behind the events still to come.
            gate.put_nowait(None)
            while b"\n\n" not in buffer:
                buffer += await asyncio.wait_for(resp.content.readany(), 5)
            event, _, buffer = buffer.partition(b"\n\n")
            assert event.startswith(f"id: {index}\ndata: ".encode())
            assert f"Royalty insight number {index}.".encode() in event
            if index < 2:  # the final "done" event is not gated: it may follow at once
                assert buffer == b""  # nothing beyond the one event has arrived
            assert gate.empty()
        rest = buffer + await asyncio.wait_for(resp.content.read(), 5)
    assert rest == b"event: done\ndata: {}\n\n"


# -- cancellation -----------------------------------------------------------------------------


async def test_client_disconnect_cancels_the_upstream_request(
    serve: Serve, start_proxy: ProxyFactory
) -> None:
    started = asyncio.Event()
    finished = asyncio.Event()
    outcome: list[str] = []
    never = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        try:
            await never.wait()
            outcome.append("completed")  # pragma: no cover - never set
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        finally:
            finished.set()
        return web.Response()  # pragma: no cover

    app = web.Application()
    app.router.add_get("/slow", slow)
    proxy = await start_proxy(static_config(await serve(app)))

    url = URL(proxy.addresses["proxy"])
    _, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: p\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(started.wait(), 5)
    writer.close()  # the client goes away mid-request
    await writer.wait_closed()

    await asyncio.wait_for(finished.wait(), 5)
    assert outcome == ["cancelled"]


# -- an upstream that breaks off ---------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000 + b"\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_response_the_upstream_breaks_off_is_never_passed_on_as_complete(
    head: bytes, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    async def answer_then_hang_up(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_then_hang_up, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        proxy = await start_proxy(static_config(f"http://127.0.0.1:{port}"))
        async with http.get(target(proxy, "/export")) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()


# -- compressed bodies ------------------------------------------------------------------------


async def test_gzip_response_body_and_header_reach_the_client_untouched(
    serve: Serve, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    compressed = gzip.compress(b"isrc,units\n" + b"QZFAK0000001,42\n" * 2000, mtime=0)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=compressed, headers={"Content-Encoding": "gzip", "Content-Type": "text/csv"}
        )

    app = web.Application()
    app.router.add_get("/export", handler)
    proxy = await start_proxy(static_config(await serve(app)))

    async with http.get(
        target(proxy, "/export"), headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == compressed


async def test_gzip_request_body_reaches_the_upstream_byte_identical(
    serve: Serve, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    seen: list[tuple[str | None, bytes]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Content-Encoding"), await request.read()))
        return web.Response(text="stored")

    app = web.Application()
    app.router.add_post("/ingest", handler)
    proxy = await start_proxy(static_config(await serve(app)))
    compressed = gzip.compress(b'{"rows": [1, 2, 3]}' * 500, mtime=0)

    async with http.post(
        target(proxy, "/ingest"),
        data=compressed,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 200
        assert await resp.text() == "stored"
    assert seen == [("gzip", compressed)]
