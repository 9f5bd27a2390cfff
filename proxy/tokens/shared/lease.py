"""Leases on shared items: take one (or find the item ready without it), give it up leaving
the error for the waiters, and what an item reads as (:class:`Shared`). See
:mod:`proxy.tokens.shared` for the protocol every replica follows."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.clock import Clock
from proxy.errors import CredentialRejected, RateLimited, TokenFetchError
from proxy.store.base import SharedStore
from proxy.store.records import Lease, Names, Record, Snapshot, StoreUnavailable
from proxy.tokens.token import Token

log = logging.getLogger("proxy.tokens")

#: A stored token is adopted only while more than this fraction of its life is left; otherwise
#: the replica renews it (and renewing it again soon would be a loop).
ADOPT_FRACTION = 0.25
#: How long a failed renewal's error is served to other replicas instead of calling again,
#: when the endpoint sent no Retry-After.
FAILURE_HOLD = 0.5


# -- what the store holds ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shared:
    """A token or credential as read from the store, with when (on our clocks) it was read."""

    value: str
    remaining: float
    """Seconds it has left, as the store's clock counted them when read."""
    lifetime: float
    """The life it had when written (what "a quarter of its life" is counted against)."""
    extra: Mapping[str, Any]
    read_at: float
    wall_read_at: float

    @classmethod
    def of(cls, record: Record, read_at: float, wall_read_at: float) -> Shared | None:
        p = record.payload
        if p is None or record.remaining <= 0:
            return None
        value, life, extra = p.get("v"), p.get("l"), p.get("x")
        if not isinstance(value, str) or not value or not isinstance(life, int | float):
            return None
        return cls(
            value=value,
            remaining=record.remaining,
            lifetime=float(life),
            extra=extra if isinstance(extra, dict) else {},
            read_at=read_at,
            wall_read_at=wall_read_at,
        )

    def fresh(self) -> bool:
        return self.remaining > ADOPT_FRACTION * self.lifetime

    def token(self) -> Token:
        """As a :class:`Token`: its life counted from before the read, so never too long."""
        return Token(
            value=self.value,
            obtained_at=self.read_at,
            lifetime=self.remaining,
            wall_expires_at=self.wall_read_at + self.remaining,
        )


def payload(value: str, lifetime: float, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"v": value, "l": lifetime, "x": dict(extra or {})}


# -- leases -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Claim:
    """The outcome of :func:`take_lease`: a lease (and the item as read under it), or the item
    found ready without one."""

    snapshot: Snapshot
    read_at: float
    wall_read_at: float
    lease: Lease | None = None
    waited: bool = False

    def shared(self) -> Shared | None:
        return Shared.of(self.snapshot.record, self.read_at, self.wall_read_at)


async def take_lease(
    store: SharedStore,
    names: Names,
    clock: Clock,
    ready: Callable[[Shared | None], bool] | None = None,
) -> Claim:
    """Take the lease on ``names``, or find the item ``ready`` without it.

    While another replica holds the lease, look again every ``poll_interval`` on the store's
    lease clock (real time for Redis, whose server's clock the lease runs on) for at most two
    lease times; a live holder extends its lease, a dead one's expires. Raises the error the last
    holder recorded, if any, and :class:`StoreUnavailable` when the store stops answering.
    """
    waits = store.lease_clock
    deadline = waits.monotonic() + 2 * store.lease
    waited = False
    while True:
        found = Claim(await store.snapshot(names), clock.monotonic(), clock.wall(), waited=waited)
        if ready is not None and ready(found.shared()):
            return found
        if found.snapshot.failure is not None:
            raise recorded(found.snapshot.failure)
        if not found.snapshot.locked:
            lease = await store.acquire(names)
            if lease is not None:
                # Read again under the lease: another replica may have renewed in between.
                read_at, wall_read_at = clock.monotonic(), clock.wall()
                try:
                    snapshot = await store.snapshot(names)
                except StoreUnavailable:
                    await release(store, lease, None)
                    raise
                return Claim(snapshot, read_at, wall_read_at, lease=lease, waited=waited)
        if waits.monotonic() >= deadline:
            raise TokenFetchError(
                "STORE_WAIT_TIMEOUT", "another replica is still renewing", retry_after=1.0
            )
        waited = True
        await waits.sleep(store.poll_interval)


async def release(store: SharedStore, lease: Lease, failure: TokenFetchError | None) -> None:
    note: dict[str, Any] | None = None
    hold = 0.0
    if failure is not None:
        kind = (
            "rejected"
            if isinstance(failure, CredentialRejected)
            else "rate_limited"
            if isinstance(failure, RateLimited)
            else "error"
        )
        note = {
            "code": failure.code,
            "message": failure.message,
            "retry_after": failure.retry_after,
            "kind": kind,
        }
        hold = max(FAILURE_HOLD, failure.retry_after or 0.0)
    with contextlib.suppress(StoreUnavailable):
        await store.release(lease, failure=note, failure_ttl=hold)


def recorded(note: Mapping[str, Any]) -> TokenFetchError:
    """The error another replica's renewal ended with, to be raised here instead of calling."""
    code = str(note.get("code") or "RENEWAL_FAILED")
    message = f"another replica's renewal failed: {note.get('message') or code}"
    retry = note.get("retry_after")
    retry_after = float(retry) if isinstance(retry, int | float) else None
    kind = note.get("kind")
    if kind == "rejected":
        return CredentialRejected(code, message, retry_after=retry_after)
    if kind == "rate_limited":
        return RateLimited(code, message, retry_after=retry_after)
    return TokenFetchError(code, message, retry_after=retry_after)


def fenced_off(lease: Lease, what: str) -> None:
    log.warning(
        "renewal lease expired during the renewal; the store keeps the newer value",
        extra={"event": "token_store_fenced", "key": lease.names.value, "what": what},
    )
