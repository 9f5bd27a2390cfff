"""The upstream read timeout (``timeouts.read``), kept with one timer per connection instead of
one per chunk.

aiohttp's client enforces ``sock_read`` by cancelling its timer and arming a new one every time
data arrives, and again when a request has been written and when a body ends: two timers armed
and two cancelled for every small request, and one more pair per chunk of a large one. On uvloop
each is a libuv handle. Turning the timeout off altogether gave the proxy 5.6 % more
throughput (docs/performance.md).

:class:`LazyReadTimeoutHandler` keeps the same rule, "the upstream may be silent for at most
``read`` seconds while a response is awaited", with a deadline instead: data arriving only moves
the deadline (one clock read, one store). A single timer per connection is armed when a wait
starts and none is armed; when it fires it either finds the deadline moved and re-arms itself
for the new one, or finds it passed and fails the response exactly as aiohttp does. A wait that
ends only clears the deadline, so the timer of a keep-alive connection is usually still armed
for the next request. The timeout therefore fires at the same moment as aiohttp's own (last
byte + ``read``), never early and never more than one event-loop iteration late.

It overrides two private methods of aiohttp's ``ResponseHandler`` and calls a third.
:func:`install` checks that they exist and otherwise leaves aiohttp's own handler in place
(slower, same behaviour), with a warning in the log.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler

log = logging.getLogger("proxy.readtimeout")

#: What the handler relies on in aiohttp's ``ResponseHandler``.
_USED = (
    "_reschedule_timeout",
    "_drop_timeout",
    "_on_read_timeout",
    "_read_timeout",
    "_read_timeout_handle",
    "_loop",
)


class LazyReadTimeoutHandler(ResponseHandler):
    """aiohttp's client protocol with a deadline-checked read timer (see the module)."""

    _deadline: float = 0.0
    """When the upstream must have sent something by; 0 when no response is awaited."""

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._deadline = 0.0
            return
        loop = self._loop
        self._deadline = deadline = loop.time() + timeout
        if self._read_timeout_handle is None:
            self._read_timeout_handle = loop.call_at(deadline, self._check_deadline)

    def _drop_timeout(self) -> None:
        # The armed timer stays: it finds no deadline and lapses, or the next request's wait
        # reuses it. connection_lost cancels it for good.
        self._deadline = 0.0

    def _check_deadline(self) -> None:
        self._read_timeout_handle = None
        deadline = self._deadline
        if not deadline:
            return
        if self._loop.time() < deadline:
            self._read_timeout_handle = self._loop.call_at(deadline, self._check_deadline)
            return
        self._deadline = 0.0
        self._on_read_timeout()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._deadline = 0.0
        handle = self._read_timeout_handle
        if handle is not None:
            # Not left to lapse: it would keep this closed connection alive until it fired.
            handle.cancel()
            self._read_timeout_handle = None


def install(connector: aiohttp.BaseConnector) -> bool:
    """Make ``connector``'s new connections use :class:`LazyReadTimeoutHandler`. Returns whether
    it could: with an aiohttp whose internals differ, the connector is left as it is."""
    factory: Any = getattr(connector, "_factory", None)
    if not isinstance(factory, functools.partial) or factory.func is not ResponseHandler:
        return False
    # A protocol that is never connected: only looked at, to see the attributes it really has.
    probe = factory()
    if not all(hasattr(probe, name) for name in _USED):
        log.warning(
            "this aiohttp's client protocol differs from the one expected; "
            "the upstream read timeout uses aiohttp's own timer",
            extra={"event": "read_timeout_fallback"},
        )
        return False
    connector._factory = functools.partial(  # type: ignore[assignment]
        LazyReadTimeoutHandler, *factory.args, **factory.keywords
    )
    return True
