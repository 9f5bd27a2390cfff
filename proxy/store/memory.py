"""The shared store in this process's memory, with Redis's leases and fencing.

Not selectable in the configuration: ``token_store: {type: memory}`` still means *no* shared
store (each replica renews on its own). This is the :class:`~proxy.store.base.SharedStore`
seam's second implementation, for tests: several :class:`~proxy.app.Proxy` instances in one
process share one :class:`MemoryBackend` through a :class:`MemoryStore` each, and leases and
lifetimes run on the injected clock, so expiry is a clock advance rather than a wait.

It keeps the semantics the Lua scripts of :mod:`proxy.store.redis_store` give: a lease is
``SET NX PX`` (one owner, expiring), writes are fenced on the owner and the version, release
is compare-and-delete, and a value's version outlives its expiry by ``GRACE``. Setting
:attr:`MemoryBackend.down` models an outage: every call fails as a Redis that does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from proxy.clock import Clock
from proxy.store.records import Lease, Names, Record, Snapshot, StoreUnavailable

log = logging.getLogger("proxy.store")

#: As :data:`proxy.store.redis_store.GRACE_MS`: how long a version outlives its value.
GRACE = 60.0


@dataclass(slots=True)
class _Value:
    version: int
    expires_at: float
    data: str | None  # JSON, so that no reader shares a writer's objects (as sealing does)


@dataclass(slots=True)
class MemoryBackend:
    """What every replica's :class:`MemoryStore` reads and writes: the server."""

    clock: Clock
    values: dict[str, _Value] = field(default_factory=dict)
    locks: dict[str, tuple[str, float]] = field(default_factory=dict)
    failures: dict[str, tuple[str, float]] = field(default_factory=dict)
    down: bool = False
    """While True, every call fails (an outage)."""

    def value(self, name: str) -> _Value | None:
        v = self.values.get(name)
        if v is not None and self.clock.monotonic() >= v.expires_at + GRACE:
            del self.values[name]
            return None
        return v

    def lock_owner(self, name: str) -> str | None:
        held = self.locks.get(name)
        if held is None:
            return None
        if self.clock.monotonic() >= held[1]:
            del self.locks[name]
            return None
        return held[0]

    def failure(self, name: str) -> str | None:
        note = self.failures.get(name)
        if note is None:
            return None
        if self.clock.monotonic() >= note[1]:
            del self.failures[name]
            return None
        return note[0]


class _Waits:
    """The lease clock a waiter reads: the deadline counts on the injected clock (where leases
    expire), but each look again waits in real time, because what it waits for, another
    replica's renewal, is real I/O that a clock which only moves when told to would never let
    finish."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def monotonic(self) -> float:
        return self._clock.monotonic()

    def wall(self) -> float:
        return self._clock.wall()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class MemoryStore:
    """One replica's handle on a :class:`MemoryBackend` (as one Redis client is on a server)."""

    def __init__(
        self,
        backend: MemoryBackend,
        *,
        prefix: str = "royalti-proxy",
        lease: float = 15.0,
        poll_interval: float = 0.01,
    ) -> None:
        self.backend = backend
        self._clock = backend.clock
        self._prefix = prefix
        self.lease = lease
        self.poll_interval = poll_interval
        self.lease_clock: Clock = _Waits(backend.clock)
        self.degraded = False
        self.errors: Counter[str] = Counter()

    def names(self, kind: str, scope: str) -> Names:
        return Names.of(self._prefix, kind, scope)

    def _call(self, op: str) -> MemoryBackend:
        if self.backend.down:
            self.errors["connection"] += 1
            if not self.degraded:
                self.degraded = True
                log.warning(
                    "token store unreachable: serving from the local cache and renewing locally",
                    extra={"event": "token_store_degraded", "store": "memory", "operation": op},
                )
            raise StoreUnavailable(f"token store {op} failed", maybe_applied=op == "write")
        if self.degraded:
            self.degraded = False
            log.info(
                "token store reachable again: sharing tokens again",
                extra={"event": "token_store_recovered", "store": "memory"},
            )
        return self.backend

    async def snapshot(self, names: Names) -> Snapshot:
        b = self._call("read")
        v = b.value(names.value)
        now = self._clock.monotonic()
        if v is None:
            record = Record(version=0, remaining=-0.001, payload=None)
        else:
            payload = json.loads(v.data) if v.data else None
            record = Record(version=v.version, remaining=v.expires_at - now, payload=payload)
        failed = b.failure(names.failed)
        return Snapshot(
            record=record,
            locked=b.lock_owner(names.lock) is not None,
            failure=json.loads(failed) if failed else None,
        )

    async def acquire(self, names: Names) -> Lease | None:
        """``SET NX PX``: the lease, or None while another owner's has not expired."""
        b = self._call("acquire")
        if b.lock_owner(names.lock) is not None:
            return None
        owner = secrets.token_hex(16)
        b.locks[names.lock] = (owner, self._clock.monotonic() + self.lease)
        return Lease(names=names, owner=owner)

    async def write(
        self, lease: Lease, *, version: int, payload: dict[str, Any] | None, life: float
    ) -> int | None:
        b = self._call("write")
        names = lease.names
        if b.lock_owner(names.lock) != lease.owner:
            lease.lost = True
            return None
        v = b.value(names.value)
        current = v.version if v is not None else 0
        if current != version:
            return None
        life = life if payload is not None else 0.0
        data = json.dumps(payload) if payload is not None else None
        b.values[names.value] = _Value(current + 1, self._clock.monotonic() + life, data)
        return current + 1

    async def extend(self, lease: Lease) -> bool:
        b = self._call("extend")
        name = lease.names.lock
        if b.lock_owner(name) != lease.owner:
            return False
        b.locks[name] = (lease.owner, self._clock.monotonic() + self.lease)
        return True

    async def release(
        self, lease: Lease, *, failure: dict[str, Any] | None = None, failure_ttl: float = 0.0
    ) -> None:
        b = self._call("release")
        names = lease.names
        if b.lock_owner(names.lock) != lease.owner:
            return
        if failure is not None:
            b.failures[names.failed] = (
                json.dumps(failure),
                self._clock.monotonic() + max(0.001, failure_ttl),
            )
        del b.locks[names.lock]

    @contextlib.asynccontextmanager
    async def keep(self, lease: Lease) -> AsyncIterator[Lease]:
        """Extend ``lease`` while the body runs, every third of the lease on the clock."""

        async def keep_alive() -> None:
            # As RedisStore's: lost when it could not be extended for a whole lease.
            confirmed = self._clock.monotonic()
            while True:
                await self._clock.sleep(self.lease / 3)
                try:
                    ok = await self.extend(lease)
                except StoreUnavailable:
                    if self._clock.monotonic() - confirmed >= self.lease:
                        lease.lost = True
                        return
                    continue
                if not ok:
                    lease.lost = True
                    return
                confirmed = self._clock.monotonic()

        task = asyncio.ensure_future(keep_alive())
        try:
            yield lease
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def status_note(self) -> str | None:
        if not self.degraded:
            return None
        return "token store memory unreachable: tokens are renewed locally"

    async def ping(self) -> bool:
        try:
            self._call("ping")
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        """Nothing to close: the backend outlives every handle on it."""
