"""At most one call in flight per key; everybody who asks meanwhile shares its outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Spawn = Callable[[Coroutine[Any, Any, V]], "asyncio.Task[V]"]


class SingleFlight(Generic[K, V]):
    """One in-flight task per key; joiners await that task.

    The task is shielded from its joiners: a joiner that is cancelled (a client that went away)
    stops waiting, but the shared call goes on for the others. Its outcome is always retrieved,
    so a failure nobody waited for is never reported as an unretrieved exception. The key is
    free again as soon as the call's coroutine has returned, before anybody is woken, so a
    joiner that reacts to a failure by asking again starts a new call.
    """

    def __init__(self, spawn: Spawn[V] | None = None) -> None:
        # ``spawn`` lets an owner track the tasks it must cancel on close (the manager does).
        self._spawn: Spawn[V] = spawn or asyncio.ensure_future
        self._tasks: dict[K, asyncio.Task[V]] = {}

    def running(self, key: K) -> asyncio.Task[V] | None:
        """The call in flight for ``key``, if any."""
        return self._tasks.get(key)

    def start(self, key: K, call: Callable[[], Coroutine[Any, Any, V]]) -> asyncio.Task[V]:
        """The call in flight for ``key``; ``call()`` is started only when there is none."""
        task = self._tasks.get(key)
        if task is None:
            task = self._spawn(self._run(key, call()))
            task.add_done_callback(_consume)
            self._tasks[key] = task
        return task

    async def join(self, key: K, call: Callable[[], Coroutine[Any, Any, V]]) -> V:
        """The outcome of the call in flight for ``key``, starting ``call()`` when none is."""
        return await asyncio.shield(self.start(key, call))

    async def close(self) -> None:
        """Cancel every call in flight and wait for them to end."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, key: K, coro: Coroutine[Any, Any, V]) -> V:
        try:
            return await coro
        finally:
            if self._tasks.get(key) is asyncio.current_task():
                del self._tasks[key]


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
