"""The shared store as the token layer sees it: one small protocol, two implementations.

:class:`~proxy.store.redis_store.RedisStore` is the real one (``token_store: {type: redis}``);
:class:`~proxy.store.memory.MemoryStore` keeps the same leases and fencing in this process, on an
injected clock, so that the sharing logic in :mod:`proxy.tokens.shared` is tested in
milliseconds against both.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Protocol

from proxy.clock import Clock
from proxy.store.records import Lease, Names, Snapshot


class SharedStore(Protocol):
    """Values with lifetimes, renewal leases (``SET NX PX``) and fenced writes (compare-and-set
    on the lease's owner and the version read under it).

    Every call may raise :class:`~proxy.store.records.StoreUnavailable`; the caller then carries
    on locally.
    """

    lease: float
    """How long a lease lasts unless extended, in seconds."""
    poll_interval: float
    """How often a replica waiting for another's renewal looks again."""
    lease_clock: Clock
    """The clock leases expire on, as a waiter reads it: real time for Redis (the server's
    clock), the injected clock for the memory store."""
    degraded: bool
    """True while the store does not answer."""
    errors: Counter[str]
    """Failed calls by reason (timeout, connection, error) and unreadable values."""

    def names(self, kind: str, scope: str) -> Names: ...

    async def snapshot(self, names: Names) -> Snapshot: ...

    async def acquire(self, names: Names) -> Lease | None:
        """The lease on ``names``, or None when another holds it."""
        ...

    async def write(
        self, lease: Lease, *, version: int, payload: dict[str, Any] | None, life: float
    ) -> int | None:
        """Write ``payload`` (None: mark the value spent) if ``lease`` is still ours and the
        value is still at ``version``; the new version, or None when fenced off."""
        ...

    async def extend(self, lease: Lease) -> bool: ...

    async def release(
        self, lease: Lease, *, failure: dict[str, Any] | None = None, failure_ttl: float = 0.0
    ) -> None: ...

    def keep(self, lease: Lease) -> contextlib.AbstractAsyncContextManager[Lease]:
        """Extend ``lease`` in the background while the body runs."""
        ...

    def status_note(self) -> str | None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...
