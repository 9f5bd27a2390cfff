"""The upstream read timeout kept with one timer per connection (proxy/readtimeout.py): it fires
when aiohttp's own would, last byte + ``read``, but arms a timer only when none is armed.

The handler is driven directly here with a loop whose clock the test moves, so no time passes;
tests/test_forwarding.py and tests/faults/test_upstream.py check the 504 and the aborted body
end to end, through real sockets.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_exceptions import SocketTimeoutError
from aiohttp.client_proto import ResponseHandler

from proxy.readtimeout import LazyReadTimeoutHandler, install
from tests.conftest import Serve

READ = 10.0


class _Handle:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualLoop:
    """The two things the handler asks of its loop: the time, and a timer."""

    def __init__(self) -> None:
        self.now = 0.0
        self.armed: list[_Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> _Handle:
        handle = _Handle(when, callback)
        self.armed.append(handle)
        return handle

    def pending(self) -> list[_Handle]:
        return [h for h in self.armed if not h.cancelled]

    def advance(self, seconds: float) -> None:
        """Move the clock on, running each timer that falls due, in order."""
        end = self.now + seconds
        while True:
            due = sorted((h for h in self.pending() if h.when <= end), key=lambda h: h.when)
            if not due:
                break
            handle = due[0]
            self.now = handle.when
            handle.cancelled = True  # ran: like a fired TimerHandle, it cannot run again
            handle.callback()
        self.now = end


def make_handler() -> tuple[LazyReadTimeoutHandler, ManualLoop]:
    loop = ManualLoop()
    handler = LazyReadTimeoutHandler(cast(Any, loop))
    handler.read_timeout = READ
    return handler, loop


def timed_out(handler: ResponseHandler) -> bool:
    return isinstance(handler.exception(), SocketTimeoutError)


def test_silence_of_read_seconds_after_the_wait_starts_fails_the_response() -> None:
    handler, loop = make_handler()
    handler.start_timeout()  # the request has been written: the wait for the answer begins
    loop.advance(READ - 0.001)
    assert not timed_out(handler)
    loop.advance(0.001)
    assert timed_out(handler)


def test_data_moves_the_deadline_without_arming_another_timer() -> None:
    handler, loop = make_handler()
    handler.start_timeout()
    for _ in range(5):  # a byte every 6 s: never silent for 10 s, for 30 s in all
        loop.advance(6)
        handler._reschedule_timeout()  # what data_received does for each chunk
    assert not timed_out(handler)
    # One timer at the start, re-armed only when it fired and found the deadline moved (at
    # 10, 16, 22 and 28 s): 5 in all, where aiohttp's own arms 6 and cancels 5.
    assert len(loop.armed) == 5
    loop.advance(READ - 0.001)  # silent from the last byte on
    assert not timed_out(handler)
    loop.advance(0.001)
    assert timed_out(handler)


def test_a_wait_that_ended_never_times_out_and_its_timer_lapses_without_rearming() -> None:
    handler, loop = make_handler()
    handler.start_timeout()
    loop.advance(3)
    handler._drop_timeout()  # the body ended (payload.on_eof) or reading paused
    loop.advance(READ * 5)
    assert not timed_out(handler)
    assert len(loop.armed) == 1
    assert loop.pending() == []


def test_a_keep_alive_connection_reuses_one_timer_for_many_requests() -> None:
    handler, loop = make_handler()
    for _ in range(1000):  # 1,000 small requests, 5 ms each: timeout armed, data, body end
        handler.start_timeout()
        loop.advance(0.002)
        handler._reschedule_timeout()
        loop.advance(0.003)
        handler._drop_timeout()
    assert not timed_out(handler)
    assert len(loop.armed) == 1  # aiohttp's own would have armed 2,000 and cancelled 2,000


def test_the_next_wait_after_a_lapsed_timer_arms_a_new_one() -> None:
    handler, loop = make_handler()
    handler.start_timeout()
    handler._drop_timeout()
    loop.advance(READ)  # the timer fires, finds nothing to wait for, and is gone
    assert loop.pending() == []
    handler.start_timeout()
    assert len(loop.pending()) == 1
    loop.advance(READ)
    assert timed_out(handler)


def test_no_read_timeout_configured_arms_nothing() -> None:
    handler, loop = make_handler()
    handler.read_timeout = None
    handler.start_timeout()
    loop.advance(1e6)
    assert loop.armed == []
    assert not timed_out(handler)


def test_a_closed_connection_cancels_its_timer_so_nothing_keeps_it_alive() -> None:
    handler, loop = make_handler()
    handler.start_timeout()
    (handle,) = loop.pending()
    handler.connection_lost(None)
    assert handle.cancelled
    loop.advance(READ * 2)
    assert not timed_out(handler)


async def test_install_makes_the_connectors_connections_use_the_handler(serve: Serve) -> None:
    big = b"x" * (4 * 1024 * 1024)  # not all there when the headers are: the connection is held

    async def ok(_: web.Request) -> web.Response:
        return web.Response(body=big)

    app = web.Application()
    app.router.add_get("/", ok)
    url = await serve(app)
    connector = aiohttp.TCPConnector()
    assert install(connector)
    timeout = aiohttp.ClientTimeout(sock_read=READ)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.get(url) as resp,
    ):
        assert resp.connection is not None
        assert type(resp.connection.protocol) is LazyReadTimeoutHandler
        assert await resp.read() == big


async def test_install_leaves_a_connector_with_a_protocol_of_its_own_alone() -> None:
    class Own(ResponseHandler):
        pass

    connector = aiohttp.TCPConnector()
    try:
        own = functools.partial(Own, loop=asyncio.get_running_loop())
        connector._factory = own  # type: ignore[assignment]
        assert not install(connector)
        assert connector._factory is own
    finally:
        await connector.close()


async def test_install_falls_back_to_aiohttps_timer_when_its_internals_differ(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(ResponseHandler, "_drop_timeout")
    connector = aiohttp.TCPConnector()
    try:
        with caplog.at_level(logging.WARNING, logger="proxy.readtimeout"):
            assert not install(connector)
        assert cast(Any, connector._factory).func is ResponseHandler
        assert [r.event for r in caplog.records] == ["read_timeout_fallback"]  # type: ignore[attr-defined]
    finally:
        await connector.close()
