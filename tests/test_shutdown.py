"""Shutdown of the real process (``python -m proxy run``) on real signals: SIGTERM drains (readiness
turns 503, the listener stops accepting, requests in flight finish) and exits 0; a second signal
exits at once; ``POST /quitquitquit`` exits 0 too.

The upstream runs in the test's own event loop. Its slow download sends a first chunk, then waits
for the test to let it finish, so the request is in flight for exactly as long as the test needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.fakes.royalti import FakeRoyalti, start_fake
from tests.conftest import WS, free_port, royalti_config, spawn_proxy

DEADLINE = 30.0
POLL = 0.2
CHUNK = b"x" * 64 * 1024
CHUNKS = 32  # 2 MiB


async def poll(
    condition: Callable[[], Awaitable[bool]], what: str, deadline: float = DEADLINE
) -> None:
    """Wait until ``condition()`` is true, checking every ``POLL`` seconds, for at most
    ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if await condition():
            return
        await asyncio.sleep(POLL)
    pytest.fail(f"timed out after {deadline}s waiting for {what}")


# -- the upstream -----------------------------------------------------------------------------


class SlowUpstream:
    """``GET /slow``: 2 MiB whose first chunk is sent at once and the rest once ``release`` is
    set. ``started`` is set when the first chunk has gone out."""

    def __init__(self) -> None:
        self.url = ""
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    @staticmethod
    def body() -> bytes:
        return CHUNK * CHUNKS

    async def slow(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(CHUNK) * CHUNKS
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)
        await resp.write(CHUNK)
        self.started.set()
        await self.release.wait()
        for _ in range(CHUNKS - 1):
            await resp.write(CHUNK)
        await resp.write_eof()
        return resp


@pytest.fixture
async def slow_upstream() -> AsyncIterator[SlowUpstream]:
    upstream = SlowUpstream()
    app = web.Application()
    app.router.add_get("/slow", upstream.slow)
    runner = web.AppRunner(app, shutdown_timeout=1.0, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    upstream.url = f"http://{host}:{port}"
    yield upstream
    upstream.release.set()
    await runner.cleanup()


# -- the process ------------------------------------------------------------------------------


@dataclass
class Running:
    proc: asyncio.subprocess.Process
    proxy: str
    admin: str
    proxy_port: int
    log: Path

    async def log_events(self) -> list[str]:
        text = await asyncio.to_thread(self.log.read_text)
        out = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line)["event"])
        return out


RunProxy = Callable[[dict[str, Any]], Awaitable[Running]]


@pytest.fixture
async def run_proxy(tmp_path: Path) -> AsyncIterator[RunProxy]:
    """``await run_proxy(config_dict)``: ``python -m proxy run`` on that configuration (listen
    addresses, log format and a 10 s shutdown_timeout filled in), once its ``/readyz`` answers
    200. Killed at the end of the test if it is still running."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(data: dict[str, Any]) -> Running:
        proxy_port, admin_port = free_port(), free_port()
        data = {
            **data,
            "listen": f"127.0.0.1:{proxy_port}",
            "admin": {**data.get("admin", {}), "listen": f"127.0.0.1:{admin_port}"},
            "shutdown_timeout": data.get("shutdown_timeout", "10s"),
            "log_format": "json",
        }
        config = tmp_path / "proxy.yaml"
        config.write_text(yaml.safe_dump(data))
        log = tmp_path / "proxy.log"
        proc = await spawn_proxy(config, log)
        procs.append(proc)
        running = Running(
            proc,
            f"http://127.0.0.1:{proxy_port}",
            f"http://127.0.0.1:{admin_port}",
            proxy_port,
            log,
        )
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                if proc.returncode is not None:
                    output = await asyncio.to_thread(log.read_text)
                    pytest.fail(f"proxy exited with {proc.returncode}:\n{output}")
                return await readyz(http, running) == 200

            await poll(ready, "the proxy to be ready")
        return running

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), DEADLINE)


async def readyz(http: aiohttp.ClientSession, running: Running) -> int | None:
    """The status of ``/readyz``, or None when the admin listener refuses the connection."""
    try:
        async with http.get(running.admin + "/readyz") as resp:
            return resp.status
    except aiohttp.ClientConnectionError:
        return None


async def refuses_connections(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


def static(url: str) -> dict[str, Any]:
    return {"upstreams": [{"name": "own", "url": url, "auth": {"type": "static", "token": "t"}}]}


async def start_download(
    http: aiohttp.ClientSession, running: Running, upstream: SlowUpstream
) -> tuple[aiohttp.ClientResponse, asyncio.Future[bytes]]:
    resp = await http.get(running.proxy + "/slow")
    assert resp.status == 200
    body = asyncio.ensure_future(resp.read())
    await asyncio.wait_for(upstream.started.wait(), DEADLINE)
    return resp, body


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_drains_the_slow_download_refuses_new_connections_and_exits_0(
    run_proxy: RunProxy,
    slow_upstream: SlowUpstream,
    first: signal.Signals,
) -> None:
    running = await run_proxy(static(slow_upstream.url))
    async with aiohttp.ClientSession() as http:
        resp, body = await start_download(http, running, slow_upstream)
        try:
            running.proc.send_signal(first)

            async def not_ready() -> bool:
                return await readyz(http, running) in (503, None)

            await poll(not_ready, "/readyz to answer 503 or refuse")
            await poll(lambda: refuses_connections(running.proxy_port), "the proxy port to refuse")
            assert not body.done()  # the download is still in flight
            assert running.proc.returncode is None  # and the process waits for it
        finally:
            slow_upstream.release.set()
        data = await asyncio.wait_for(body, DEADLINE)
        resp.release()
    assert hashlib.sha256(data).digest() == hashlib.sha256(SlowUpstream.body()).digest()
    assert await asyncio.wait_for(running.proc.wait(), DEADLINE) == 0
    events = await running.log_events()
    assert "shutdown" in events
    assert "draining" in events
    assert events[-1] == "stopped"
    assert "shutdown_cancelled" not in events


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
async def test_a_second_signal_during_the_drain_exits_at_once_without_waiting(
    run_proxy: RunProxy,
    slow_upstream: SlowUpstream,
    second: signal.Signals,
) -> None:
    running = await run_proxy(static(slow_upstream.url))
    async with aiohttp.ClientSession() as http:
        resp, body = await start_download(http, running, slow_upstream)
        running.proc.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            return await readyz(http, running) in (503, None)

        await poll(draining, "the drain to start")
        started = time.monotonic()
        running.proc.send_signal(second)
        # Well under the 10 s shutdown_timeout the slow download would otherwise be given.
        code = await asyncio.wait_for(running.proc.wait(), 5)
        assert time.monotonic() - started < 5
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(body, DEADLINE)
        resp.release()
    assert code == 1
    assert "forced_exit" in await running.log_events()


async def test_a_download_still_running_at_shutdown_timeout_is_cut_off_and_the_process_exits_0(
    run_proxy: RunProxy, slow_upstream: SlowUpstream
) -> None:
    running = await run_proxy({**static(slow_upstream.url), "shutdown_timeout": "1s"})
    async with aiohttp.ClientSession() as http:
        resp, body = await start_download(http, running, slow_upstream)
        started = time.monotonic()
        running.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running.proc.wait(), DEADLINE) == 0
        # Bounded by shutdown_timeout (aiohttp waits it once for the handler, and at most once
        # more for the cancelled handler to finish), not by the download, which never ends.
        assert time.monotonic() - started < 8
        # Cut off, never ended as if complete.
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(body, DEADLINE)
        resp.release()
    assert (await running.log_events())[-1] == "stopped"


async def test_a_download_cut_off_at_shutdown_timeout_is_reported_in_the_log(
    run_proxy: RunProxy, slow_upstream: SlowUpstream
) -> None:
    running = await run_proxy({**static(slow_upstream.url), "shutdown_timeout": "1s"})
    async with aiohttp.ClientSession() as http:
        resp, body = await start_download(http, running, slow_upstream)
        running.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running.proc.wait(), DEADLINE) == 0
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(body, DEADLINE)
        resp.release()
    assert "shutdown_cancelled" in await running.log_events()


async def test_quitquitquit_makes_the_process_exit_0(
    run_proxy: RunProxy,
) -> None:
    fake = FakeRoyalti()
    runner, url = await start_fake(fake)
    try:
        data = royalti_config(url, default_workspace=WS[0])
        data["admin"] = {"enable_quit": True}
        running = await run_proxy(data)  # ready: the default workspace's token was fetched
        assert fake.authtoken_calls[WS[0]] == 1
        async with aiohttp.ClientSession() as http:
            async with http.get(running.proxy + "/user/") as resp:
                assert resp.status == 200
            async with http.post(running.admin + "/quitquitquit") as resp:
                assert resp.status == 202
        assert await asyncio.wait_for(running.proc.wait(), DEADLINE) == 0
    finally:
        await runner.cleanup()
    events = await running.log_events()
    assert "quit_requested" in events
    assert events[-1] == "stopped"


async def test_sighup_reloads_the_configuration_and_a_broken_one_is_rejected(
    run_proxy: RunProxy, tmp_path: Path
) -> None:
    fake = FakeRoyalti()
    runner, url = await start_fake(fake)
    try:
        data = royalti_config(url, default_workspace=WS[0])
        running = await run_proxy(data)
        config = tmp_path / "proxy.yaml"
        written = yaml.safe_load(config.read_text())
        # A second route, under /extra, with an API key.
        written["upstreams"].append(
            {
                "name": "extra",
                "url": url,
                "path_prefix": "/extra",
                "auth": {"type": "royalti", "api_key": "RWAK-demo-key"},
            }
        )
        config.write_text(yaml.safe_dump(written))
        running.proc.send_signal(signal.SIGHUP)
        async with aiohttp.ClientSession() as http:

            async def extra_route_served() -> bool:
                async with http.get(running.proxy + "/extra/user/") as resp:
                    return resp.status == 200

            await poll(extra_route_served, "the reloaded route")
            config.write_text("upstreams: not-a-list\n")
            running.proc.send_signal(signal.SIGHUP)

            async def rejected() -> bool:
                return "reload_rejected" in await running.log_events()

            await poll(rejected, "the broken configuration to be rejected")
            async with http.get(running.proxy + "/extra/user/") as resp:
                assert resp.status == 200  # the running configuration was kept
        assert fake.login_calls == 1  # the unchanged Royalti upstream kept its tokens
        running.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running.proc.wait(), DEADLINE) == 0
    finally:
        await runner.cleanup()
    events = await running.log_events()
    assert events.count("reload_requested") == 2
    assert "reloaded" in events
