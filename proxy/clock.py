"""Time as an injectable dependency.

Every component that needs to know the time, or to wait, takes a :class:`Clock`. Production code
uses :class:`SystemClock`; tests use :class:`FakeClock` and move time forward with
:meth:`FakeClock.advance`, so expiry and refresh are tested in milliseconds instead of by sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    """The two clocks the proxy reads and the one way it waits."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps; used for every expiry and schedule."""

    def wall(self) -> float:
        """Seconds since the Unix epoch; used only for display and exported timestamps."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on this clock."""


class SystemClock:
    """The real clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when told to.

    ``sleep`` parks the caller until :meth:`advance` moves time past its deadline. ``wall`` is
    ``monotonic`` plus a fixed offset, so tests can model a machine whose wall clock is wrong.
    """

    def __init__(self, start: float = 1_000.0, wall_offset: float = 1_800_000_000.0) -> None:
        self._now = start
        self.wall_offset = wall_offset
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self.wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    @property
    def sleepers(self) -> int:
        """How many tasks are waiting on this clock (cancelled waits excluded)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    async def advance(self, seconds: float, *, step: float | None = None) -> None:
        """Move time forward, waking every sleeper whose deadline passes, in deadline order.

        With ``step``, time moves in increments of at most ``step`` and the event loop runs
        between them, so that work triggered by one wake-up can schedule the next.
        """
        target = self._now + seconds
        while True:
            await settle()
            if self._sleepers and self._sleepers[0][0] <= target:
                deadline, _, fut = heapq.heappop(self._sleepers)
                if step is not None and deadline - self._now > step:
                    heapq.heappush(self._sleepers, (deadline, next(self._seq), fut))
                    self._now += step
                    continue
                self._now = max(self._now, deadline)
                if not fut.done():
                    fut.set_result(None)
                continue
            if step is not None and target - self._now > step:
                self._now += step
                continue
            self._now = target
            await settle()
            return


async def settle(rounds: int = 20) -> None:
    """Let the event loop run ready callbacks for a few rounds."""
    for _ in range(rounds):
        await asyncio.sleep(0)
