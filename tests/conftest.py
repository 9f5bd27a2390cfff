"""Shared fixtures: an injected clock, the fake Royalti API on a real socket, and a factory that
starts the real proxy (on a free loopback port) in front of it."""

from __future__ import annotations

import asyncio
import copy
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import Proxy
from proxy.clock import FakeClock
from proxy.config import build
from proxy.fakes.royalti import FakeRoyalti, start_fake

EMAIL = "ops@example.com"
PASSWORD = "correct-horse"
WS = ("786acdf7-fa3e-4ab2-91d5-13f0b6a8ad97", "ws-beta", "ws-gamma", "ws-delta")

ROOT = Path(__file__).resolve().parent.parent

#: pytester: for the tests of the suite's own checks. tests.loop_exceptions: every event loop's
#: exception handler fails the test that made it report (see that module).
pytest_plugins = ("pytester", "tests.loop_exceptions")

ProxyFactory = Callable[..., Awaitable[Proxy]]
Serve = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake(clock: FakeClock) -> FakeRoyalti:
    return FakeRoyalti(wall=clock.wall, access_lifetime=600, refresh_lifetime=3600)


@pytest.fixture
async def fake_url(fake: FakeRoyalti) -> AsyncIterator[str]:
    runner, url = await start_fake(fake)
    yield url
    await runner.cleanup()


def royalti_config(url: str, **auth: Any) -> dict[str, Any]:
    base_auth: dict[str, Any] = {"type": "royalti", "email": EMAIL, "password": PASSWORD}
    base_auth.update(auth)
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "upstreams": [{"name": "royalti", "url": url, "path_prefix": "/", "auth": base_auth}],
    }


@pytest.fixture
async def start_proxy(clock: FakeClock) -> AsyncIterator[ProxyFactory]:
    """``await start_proxy(config_dict)``: the real proxy, stopped at the end of the test."""
    started: list[Proxy] = []

    async def factory(data: dict[str, Any], *, env: dict[str, str] | None = None) -> Proxy:
        config = build(copy.deepcopy(data), env or {}, source="test")
        proxy = Proxy(config, clock=clock)
        await proxy.start()
        started.append(proxy)
        return proxy

    yield factory
    for proxy in reversed(started):
        await proxy.stop()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(app)``: an upstream of the test's own on a free loopback port. It keeps
    bodies as sent (no decompression) and cancels a handler whose client went away."""
    runners: list[web.AppRunner] = []

    async def _serve(app: web.Application) -> str:
        runner = web.AppRunner(
            app, handler_cancellation=True, auto_decompress=False, shutdown_timeout=1.0
        )
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield _serve
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def run_for(clock: FakeClock, proxy: Proxy, seconds: float, step: float) -> None:
    """Move the clock forward in steps, letting every renewal that falls due finish its I/O."""
    end = clock.monotonic() + seconds
    while clock.monotonic() < end:
        await clock.advance(min(step, end - clock.monotonic()))
        for manager in proxy.managers.values():
            await manager.wait_idle()


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def spawn_proxy(config: Path, log: Path) -> asyncio.subprocess.Process:
    """``python -m proxy run --config CONFIG`` as a real process, its output in ``log``, with no
    ``ROYALTI_*`` variable of this environment leaking into it."""
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "run",
            "--config",
            str(config),
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("ROYALTI_")},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
