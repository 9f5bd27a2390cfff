"""One key's place in the :class:`~proxy.tokens.manager.TokenManager`'s cache (an LRU of them),
and the state it reports (to the token-status endpoint, readiness and metrics)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from cachetools import LRUCache

from proxy.tokens.token import Token


@dataclass(slots=True, eq=False)
class Entry:
    key: str
    last_used: float
    pinned: bool = False
    token: Token | None = None
    fetched_wall: float | None = None
    loop: asyncio.Task[None] | None = None
    next_refresh: float | None = None
    failures: int = 0
    last_error: str | None = None
    next_attempt: float = 0.0
    dropped_at: float = -math.inf
    """When an upstream rejection last dropped this key's token (monotonic)."""
    refused: bool = False
    """The last fetch was refused as an unknown workspace (while a token was still valid)."""
    unknown: bool = False
    """Refused as an unknown workspace: its waiters get UnknownWorkspace."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Entries(LRUCache[str, Entry]):
    """An LRU of entries that tells ``evicted`` about each one it evicts (the manager then stops
    the evicted key's background work)."""

    def __init__(self, maxsize: int, evicted: Callable[[Entry], None]) -> None:
        super().__init__(maxsize)
        self._evicted = evicted

    def popitem(self) -> tuple[str, Entry]:
        key, entry = super().popitem()
        self._evicted(entry)
        return key, entry


@dataclass(frozen=True, slots=True)
class TokenState:
    """One key's state, for the token-status endpoint, readiness and metrics. No secret in it."""

    key: str
    state: str  # valid | static | renewing | failing | expired | empty | unknown_workspace
    valid: bool
    """A token that can be injected now (also while it is being renewed)."""
    idle_for: float
    """Seconds since a request last asked for this key."""
    fingerprint: str | None
    expires_in: float | None
    wall_expires_at: float | None
    fetched_wall: float | None
    next_refresh_in: float | None
    consecutive_failures: int
    last_error: str | None
    pinned: bool


def state_of(e: Entry, now: float, *, renewing: bool) -> TokenState:
    """What ``e`` reports at ``now``; ``renewing`` while a fetch for it runs."""
    t = e.token
    valid = t is not None and t.is_valid(now)
    if renewing:
        state = "renewing"
    elif valid and e.failures:
        state = "failing"
    elif valid and t is not None and not t.expires:
        state = "static"
    elif valid:
        state = "valid"
    elif t is not None or e.failures:
        state = "expired"
    else:
        state = "empty"
    # A credential that does not expire shows no expiry and no refresh: a file's re-read
    # schedule is not a refresh, and a made-up expiry would mislead an alert.
    static = t is not None and not t.expires
    return TokenState(
        key=e.key,
        state=state,
        valid=valid,
        idle_for=round(now - e.last_used, 3),
        fingerprint=t.fingerprint if t else None,
        expires_in=round(t.remaining(now), 3) if t and not static else None,
        wall_expires_at=t.wall_expires_at if t and not static else None,
        fetched_wall=e.fetched_wall,
        next_refresh_in=(
            None if static or e.next_refresh is None else round(e.next_refresh - now, 3)
        ),
        consecutive_failures=e.failures,
        last_error=e.last_error,
        pinned=e.pinned,
    )
