"""Who may call the proxy and how much one client may ask of it: the inbound guard and the
limits on headers, bodies, concurrency and slow clients."""

from __future__ import annotations

import asyncio
import logging
import os
import stat

import aiohttp
import pytest
from aiohttp import web

from proxy import inbound
from proxy.config import build
from proxy.errors import ConfigError
from proxy.inbound import Notices

TOKEN = "inbound-test-token"


@pytest.fixture
async def upstream():
    """A real upstream that records what it receives; ``gate`` holds requests when set."""
    state: dict = {"seen": [], "gate": None}

    async def handle(request: web.Request) -> web.Response:
        state["seen"].append(dict(request.headers))
        body = await request.read()
        if state["gate"] is not None:
            await state["gate"].wait()
        return web.json_response({"len": len(body)})

    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield state
    if state["gate"] is not None:
        state["gate"].set()
    await runner.cleanup()


def config(url: str, **top) -> dict:
    data = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "upstreams": [{"name": "u", "url": url, "auth": {"type": "static", "token": TOKEN}}],
    }
    upstream = top.pop("upstream", {})
    data["upstreams"][0].update(upstream)
    data.update(top)
    return data


async def _status(http, url, **kw):
    async with http.request(kw.pop("method", "GET"), url, **kw) as resp:
        return resp.status, resp.headers.get("X-Royalti-Proxy-Error"), resp.headers


def test_a_non_loopback_listen_address_without_a_guard_refuses_to_start():
    with pytest.raises(ConfigError) as info:
        build(config("http://up.example", listen="0.0.0.0:8080"), {}, source="t")
    (problem,) = info.value.problems
    assert problem.startswith("listen: 0.0.0.0:8080 is not a loopback address")
    for option in (
        "inbound.allowed_cidrs",
        "inbound.shared_secret_file",
        "unix:",
        "inbound.allow_unauthenticated",
    ):
        assert option in problem


@pytest.mark.parametrize(
    "inbound",
    [
        {"allowed_cidrs": ["172.16.0.0/12"]},
        {"shared_secret": "s3cret"},
        {"allow_unauthenticated": True},
    ],
)
def test_a_non_loopback_listen_address_with_a_guard_or_the_override_is_accepted(inbound):
    cfg = build(config("http://up.example", listen="0.0.0.0:8080", inbound=inbound), {}, source="t")
    assert not cfg.listen.is_loopback


async def test_the_override_is_logged_loudly(upstream, start_proxy, caplog):
    with caplog.at_level("WARNING", logger="proxy"):
        await start_proxy(
            config(upstream["url"], listen="0.0.0.0:0", inbound={"allow_unauthenticated": True})
        )
    assert any(getattr(r, "event", None) == "unguarded" for r in caplog.records)


async def test_a_client_outside_allowed_cidrs_gets_403_and_the_upstream_is_not_called(
    upstream, start_proxy, http
):
    proxy = await start_proxy(config(upstream["url"], inbound={"allowed_cidrs": ["10.0.0.0/8"]}))
    status, code, _ = await _status(http, proxy.addresses["proxy"] + "/x")
    assert (status, code) == (403, "CLIENT_NOT_ALLOWED")
    assert upstream["seen"] == []


async def test_a_client_inside_allowed_cidrs_is_served(upstream, start_proxy, http):
    proxy = await start_proxy(config(upstream["url"], inbound={"allowed_cidrs": ["127.0.0.0/8"]}))
    status, _, _ = await _status(http, proxy.addresses["proxy"] + "/x")
    assert status == 200


async def test_the_shared_secret_is_required_and_removed_before_forwarding(
    upstream, start_proxy, http, tmp_path
):
    secret = tmp_path / "secret"
    secret.write_text("let-me-in\n")
    proxy = await start_proxy(
        config(
            upstream["url"],
            inbound={"shared_secret_file": str(secret), "shared_secret_header": "X-Sidecar-Key"},
        )
    )
    url = proxy.addresses["proxy"] + "/x"
    for headers in ({}, {"X-Sidecar-Key": "let-me-i"}, {"X-Sidecar-Key": "let-me-in!"}):
        status, code, _ = await _status(http, url, headers=headers)
        assert (status, code) == (401, "CLIENT_UNAUTHENTICATED")
    assert upstream["seen"] == []
    status, _, _ = await _status(http, url, headers={"X-Sidecar-Key": "let-me-in"})
    assert status == 200
    assert "X-Sidecar-Key" not in upstream["seen"][0]
    assert upstream["seen"][0]["Authorization"] == f"Bearer {TOKEN}"


async def test_a_unix_socket_listener_gets_the_configured_file_mode(
    upstream, start_proxy, tmp_path
):
    path = tmp_path / "proxy.sock"
    proxy = await start_proxy(
        config(upstream["url"], listen=f"unix:{path}", inbound={"unix_socket_mode": "0600"})
    )
    assert proxy.addresses["proxy"] == f"unix:{path}"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    connector = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession(connector=connector) as unix, unix.get("http://x/x") as resp:
        assert resp.status == 200


async def test_requests_beyond_max_concurrent_get_503_overloaded_with_retry_after(
    upstream, start_proxy, http
):
    proxy = await start_proxy(config(upstream["url"], upstream={"max_concurrent": 2}))
    upstream["gate"] = asyncio.Event()
    url = proxy.addresses["proxy"] + "/x"
    held = [asyncio.ensure_future(_status(http, url)) for _ in range(2)]
    for _ in range(500):  # both held requests reach the upstream (real I/O, bounded wait)
        if len(upstream["seen"]) == 2:
            break
        await asyncio.sleep(0.01)
    status, code, headers = await _status(http, url)
    assert (status, code) == (503, "OVERLOADED")
    assert int(headers["Retry-After"]) >= 1
    upstream["gate"].set()
    assert [s for s, _, _ in await asyncio.gather(*held)] == [200, 200]
    status, _, _ = await _status(http, url)
    assert status == 200


async def test_a_body_over_max_body_size_gets_413_by_content_length(upstream, start_proxy, http):
    proxy = await start_proxy(config(upstream["url"], upstream={"max_body_size": "1KiB"}))
    url = proxy.addresses["proxy"] + "/x"
    status, code, _ = await _status(http, url, method="POST", data=b"x" * 2048)
    assert (status, code) == (413, "BODY_TOO_LARGE")
    assert upstream["seen"] == []
    status, _, _ = await _status(http, url, method="POST", data=b"x" * 1024)
    assert status == 200


async def test_a_chunked_body_over_max_body_size_gets_413(upstream, start_proxy, http):
    proxy = await start_proxy(config(upstream["url"], upstream={"max_body_size": "64KiB"}))

    async def chunks():
        for _ in range(8):
            yield b"y" * 16384

    status, code, _ = await _status(
        http, proxy.addresses["proxy"] + "/x", method="POST", data=chunks()
    )
    assert (status, code) == (413, "BODY_TOO_LARGE")


async def test_headers_beyond_the_size_or_count_limits_are_refused(upstream, start_proxy, http):
    proxy = await start_proxy(
        config(upstream["url"], limits={"max_header_size": 1024, "max_headers": 20})
    )
    url = proxy.addresses["proxy"] + "/x"
    status, _, _ = await _status(http, url, headers={"X-Big": "v" * 2000})
    assert status in (400, 431)
    many = {f"X-H{i}": "v" for i in range(40)}
    status, _, _ = await _status(http, url, headers=many)
    assert status in (400, 431)
    assert upstream["seen"] == []
    status, _, _ = await _status(http, url, headers={"X-Ok": "v" * 500})
    assert status == 200


async def test_a_client_that_trickles_its_headers_is_disconnected_after_header_timeout(
    upstream, start_proxy
):
    # A real-time timeout of the proxy itself is what is under test: kept short.
    proxy = await start_proxy(config(upstream["url"], limits={"header_timeout": 0.3}))
    host, port = proxy.addresses["proxy"].removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=5)  # EOF once the proxy closes it
    assert data == b""
    writer.close()
    assert upstream["seen"] == []


async def test_a_malformed_request_is_one_info_line_not_an_error_with_a_traceback(
    upstream, start_proxy, http, caplog
):
    proxy = await start_proxy(config(upstream["url"], limits={"max_header_size": 1024}))
    with caplog.at_level("DEBUG"):
        status, _, _ = await _status(
            http, proxy.addresses["proxy"] + "/x", headers={"X-Big": "v" * 4000}
        )
    assert status in (400, 431)
    bad = [r for r in caplog.records if getattr(r, "event", None) == "bad_request"]
    assert len(bad) == 1
    assert bad[0].levelname == "INFO"
    assert bad[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= 40]  # no ERROR, no traceback


async def test_200_slowloris_connections_are_cut_at_the_deadline_without_a_traceback(
    upstream, start_proxy, caplog, loop_exceptions
):
    # Real time again (the proxy's own timer); every connection is cut, and what it costs the
    # log is one DEBUG line each and a single INFO line for the burst.
    proxy = await start_proxy(config(upstream["url"], limits={"header_timeout": 0.5}))
    host, port = proxy.addresses["proxy"].removeprefix("http://").split(":")
    with caplog.at_level("DEBUG"):
        conns = []
        for _ in range(200):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
            conns.append((reader, writer))
        data = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in conns)), timeout=20)
        for _, writer in conns:
            writer.close()
    assert data == [b""] * 200  # each closed by the proxy, nothing answered
    assert upstream["seen"] == []
    assert loop_exceptions.take() == []  # the plugin would fail the test too; said here
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    cuts = [r for r in caplog.records if getattr(r, "event", None) == "header_timeout"]
    assert len(cuts) == 200
    (info,) = [r for r in cuts if r.levelno == logging.INFO]
    assert (info.count, info.peer) == (1, "127.0.0.1")
    assert all(r.levelno == logging.DEBUG for r in cuts if r is not info)


def test_attack_notices_log_one_info_line_per_interval_and_debug_lines_between(caplog):
    now = [100.0]
    notices = Notices("header_timeout", "cut", interval=60.0, now=lambda: now[0])
    with caplog.at_level("DEBUG", logger="proxy.http"):
        for t in (100.0, 110.0, 159.9, 160.0, 161.0, 300.0):
            now[0] = t
            notices.note(peer="p")
    levels = [(r.levelname, getattr(r, "count", None)) for r in caplog.records]
    # The first of a burst at once; then how many since the last INFO line, at most once a minute.
    assert levels == [
        ("INFO", 1),
        ("DEBUG", None),
        ("DEBUG", None),
        ("INFO", 3),
        ("DEBUG", None),
        ("INFO", 2),
    ]
    caplog.clear()
    with caplog.at_level("INFO", logger="proxy.http"):
        now[0] = 301.0
        notices.note(peer="p")  # a DEBUG line nobody reads is not even built
    assert caplog.records == []


async def test_an_aiohttp_without_the_request_counter_gets_no_header_deadline_and_a_warning(
    monkeypatch, caplog
):
    monkeypatch.setattr(inbound, "HANDLER_PRIVATE", ("_no_such_counter",))

    async def handler(request):
        return web.Response()

    with caplog.at_level("WARNING", logger="proxy.http"):
        server = inbound.GuardedServer(handler, header_timeout=0.1, access_log=None)
    assert [getattr(r, "event", None) for r in caplog.records] == ["header_timeout_fallback"]
    assert server().connection_made.__func__ is web.RequestHandler.connection_made
