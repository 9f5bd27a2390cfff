"""The per-key token cache: single-flight fetches, refresh ahead, backoff, serve-until-expiry.

One :class:`TokenManager` serves one upstream. Keys are Royalti workspace ids, or
:data:`~proxy.tokens.source.SINGLE_KEY` for sources with one credential. Per key:

* **Single-flight**: at most one fetch runs; every request that needs the token awaits that one
  fetch (shielded, so a client that disconnects does not cancel it for the others).
* **Refresh ahead**: a background task per key wakes at :meth:`Token.refresh_at` and renews the
  token while it is still valid, so in steady state no request waits.
* **Failures**: exponential backoff with jitter between ``min_backoff`` and ``max_backoff``,
  never shorter than the server's ``Retry-After``; a rejected credential waits ``max_backoff``.
  The current token keeps being served until it really expires; after that, requests get
  :class:`~proxy.errors.TokenUnavailable` at once, without calling anything, until the next
  attempt is due.
* **Idle keys** (not used for ``idle_timeout``) are not renewed and drop out; pinned keys (the
  default workspaces, which readiness depends on) never do. The cache is an LRU bounded by
  ``max_entries``.
* **Unknown workspaces**: a workspace a client named that the source refuses
  (:class:`~proxy.errors.WorkspaceRejected`) and that has no valid token is the client's mistake,
  not a configuration error: it leaves the token cache (no background renewal, no task) for a
  separate negative cache, bounded by ``max_entries`` and remembered for ``max_backoff``, and
  requests for it get :class:`~proxy.errors.UnknownWorkspace` without an upstream call. A pinned
  workspace refused the same way stays what it was: a configuration error readiness reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cachetools import LRUCache

from proxy.clock import Clock
from proxy.config import TokenSettings
from proxy.errors import (
    CredentialRejected,
    TokenFetchError,
    TokenUnavailable,
    UnknownWorkspace,
    WorkspaceRejected,
)
from proxy.tokens.backoff import retry_delay
from proxy.tokens.singleflight import SingleFlight
from proxy.tokens.source import TokenSource
from proxy.tokens.token import Token

log = logging.getLogger("proxy.tokens")
_T = TypeVar("_T")

#: A workspace id longer than this is refused as unknown without asking the upstream: Royalti's
#: are 36-character UUIDs, and a client-chosen key is kept in memory and sent as a query.
MAX_WORKSPACE_LENGTH = 128
#: Unknown-workspace log lines named per ``max_backoff`` interval; the rest are counted.
UNKNOWN_LOG_BURST = 10
#: After an upstream rejection dropped a key's token, its replacement is not dropped again by a
#: rejection for this long: an endpoint that answers 401 whatever the token (one the user may not
#: use, chosen by the client) would otherwise cost a token renewal per request.
MIN_AGE_TO_DROP_AGAIN = 30.0


@dataclass(slots=True, eq=False)
class _Entry:
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


@dataclass(slots=True, eq=False)
class _Unknown:
    """A workspace the source refused, remembered so that asking again costs nothing."""

    key: str
    until: float
    last_used: float
    code: str


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


class _Entries(LRUCache[str, _Entry]):
    """An LRU whose evictions stop the evicted key's background work."""

    def __init__(self, maxsize: int, manager: TokenManager) -> None:
        super().__init__(maxsize)
        self._manager = manager

    def popitem(self) -> tuple[str, _Entry]:
        key, entry = super().popitem()
        self._manager._retire(entry, reason="lru")
        return key, entry


class TokenManager:
    """Caches and renews the tokens of one upstream."""

    def __init__(
        self,
        *,
        upstream: str,
        source: TokenSource,
        clock: Clock,
        settings: TokenSettings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.upstream = upstream
        self.source = source
        self._clock = clock
        self._settings = settings or TokenSettings()
        self._rng = rng or random.Random()
        self._entries = _Entries(self._settings.max_entries, self)
        # Pinned keys (the default workspaces readiness depends on) live outside the LRU, so no
        # amount of traffic to other workspaces can evict them.
        self._pinned: dict[str, _Entry] = {}
        # Unknown workspaces, oldest first (all are remembered for the same time, so insertion
        # order is expiry order): purged from the front, bounded like the token cache.
        self._unknown: OrderedDict[str, _Unknown] = OrderedDict()
        self._unknown_logged = 0
        self._unknown_suppressed = 0
        self._unknown_log_window = -math.inf
        self._tasks: set[asyncio.Task[Any]] = set()
        # One fetch per entry (not per key: a forgotten workspace's entry may still be fetching
        # while a new one for the same key starts), spawned as a task close() cancels.
        self._flights: SingleFlight[_Entry, Token] = SingleFlight(self._spawn)
        self._closed = False
        # Plain counters, read by the metrics collector at scrape time: nothing on the hot path
        # touches a metric object.
        self.hits = 0
        self.misses = 0
        self.waits = 0

    # -- the hot path -------------------------------------------------------------------------

    async def get(self, key: str) -> Token:
        """The token for ``key``, fetching it (once, however many ask) when there is none."""
        token = self.cached(key)
        if token is not None:
            return token
        entry = self._pinned.get(key) or self._entries.get(key)
        now = self._clock.monotonic()
        if entry is not None:
            entry.last_used = now
        elif self.source.per_workspace:
            self._check_unknown(key, now)
        return await self._get_slow(key, entry, now)

    def cached(self, key: str) -> Token | None:
        """:meth:`get`'s fast path without a coroutine: the cached token for ``key`` while it is
        valid, else None (then ``await get(key)``)."""
        entry = self._pinned.get(key) or self._entries.get(key)
        if entry is None:
            return None
        token = entry.token
        now = self._clock.monotonic()
        if token is None or now >= token.expires_at:
            return None
        entry.last_used = now
        self.hits += 1
        return token

    def peek(self, key: str) -> Token | None:
        """The cached token for ``key`` if it is still valid, without fetching."""
        entry = self._find(key)
        if entry is None or entry.token is None:
            return None
        return entry.token if entry.token.is_valid(self._clock.monotonic()) else None

    async def _get_slow(self, key: str, entry: _Entry | None, now: float) -> Token:
        self.misses += 1
        if entry is None:
            entry = self._new_entry(key, now)
        if self._flights.running(entry) is None and now < entry.next_attempt:
            if entry.refused and not entry.pinned:
                # Its token has run out and Royalti said the workspace is not (or no
                # longer) the user's: the client's problem from now on.
                self._forget_workspace(entry, entry.last_error or "", now)
                raise self._unknown_error()
            raise self._unavailable(entry, now)
        self.waits += 1
        try:
            return await self._flights.join(entry, lambda: self._fetch(entry))
        except TokenFetchError:
            if entry.unknown:
                raise self._unknown_error() from None
            raise self._unavailable(entry, self._clock.monotonic()) from None

    def _unavailable(self, entry: _Entry, now: float) -> TokenUnavailable:
        wait = max(1.0, entry.next_attempt - now)
        return TokenUnavailable(
            "no valid token could be obtained from the token endpoint",
            retry_after=math.ceil(wait),
            details=[f"last error: {entry.last_error}"] if entry.last_error else [],
        )

    # -- unknown workspaces -------------------------------------------------------------------

    def _check_unknown(self, key: str, now: float) -> None:
        """Raise :class:`UnknownWorkspace` when ``key`` is known to be unknown (or cannot be a
        workspace id); forget it once its time is up, so the next request asks again."""
        if len(key) > MAX_WORKSPACE_LENGTH:
            raise self._unknown_error()
        known = self._unknown.get(key)
        if known is None:
            return
        if now < known.until:
            known.last_used = now
            raise self._unknown_error()
        del self._unknown[key]

    def _unknown_error(self) -> UnknownWorkspace:
        return UnknownWorkspace(
            "unknown workspace: Royalti does not know it, or it is not this user's",
            details=[f"not asked for again before {math.ceil(self._settings.max_backoff)} s"],
        )

    def _forget_workspace(self, entry: _Entry, code: str, now: float) -> None:
        """Move ``entry`` from the token cache to the unknown workspaces: no task, no renewal."""
        entry.unknown = True
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        current = asyncio.current_task()
        if entry.loop is not None and entry.loop is not current:
            entry.loop.cancel()
        unknown = self._unknown
        while unknown:
            oldest = next(iter(unknown.values()))
            if oldest.until > now and len(unknown) < self._settings.max_entries:
                break
            unknown.popitem(last=False)
        unknown.pop(entry.key, None)
        unknown[entry.key] = _Unknown(
            key=entry.key,
            until=now + self._settings.max_backoff,
            last_used=entry.last_used,
            code=code,
        )
        self._log_unknown(entry.key, code, now)

    def _log_unknown(self, key: str, code: str, now: float) -> None:
        # A client can name any number of workspaces: a bounded number of lines per interval.
        if now - self._unknown_log_window >= self._settings.max_backoff:
            self._unknown_log_window = now
            self._unknown_logged = 0
        if self._unknown_logged >= UNKNOWN_LOG_BURST:
            self._unknown_suppressed += 1
            return
        self._unknown_logged += 1
        suppressed, self._unknown_suppressed = self._unknown_suppressed, 0
        log.warning(
            "a client asked for an unknown workspace (or one that is not this user's)",
            extra={
                "event": "unknown_workspace",
                "upstream": self.upstream,
                "workspace": key,
                "error_code": code,
                "remembered_for": self._settings.max_backoff,
                "suppressed": suppressed,
            },
        )

    # -- invalidation -------------------------------------------------------------------------

    def invalidate(self, key: str, token: Token) -> bool:
        """Drop ``token`` if it is still the cached one for ``key`` (compare-and-invalidate).

        Returns True when it was dropped. A burst of rejections of the same token drops it once,
        so it causes one renewal, not one per rejected request; and the token that replaced a
        dropped one is not dropped again for :data:`MIN_AGE_TO_DROP_AGAIN` (a fresh token that
        is refused too points at the request, not at the token).
        """
        entry = self._find(key)
        if entry is None or entry.token is None or entry.token.value != token.value:
            return False
        now = self._clock.monotonic()
        if now - entry.dropped_at < MIN_AGE_TO_DROP_AGAIN:
            return False
        entry.dropped_at = now
        entry.token = None
        log.info(
            "token rejected by upstream; dropped",
            extra={
                "event": "token_invalidated",
                "upstream": self.upstream,
                "workspace": key,
                "fingerprint": token.fingerprint,
            },
        )
        return True

    # -- fetching -----------------------------------------------------------------------------

    def _find(self, key: str) -> _Entry | None:
        return self._pinned.get(key) or self._entries.get(key)

    def _all(self) -> list[_Entry]:
        return [*self._pinned.values(), *self._entries.values()]

    def _new_entry(self, key: str, now: float) -> _Entry:
        entry = _Entry(key=key, last_used=now)
        self._entries[key] = entry
        entry.loop = self._spawn(self._renew_loop(entry))
        return entry

    def _spawn(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_fetch(self, entry: _Entry) -> asyncio.Task[Token]:
        return self._flights.start(entry, lambda: self._fetch(entry))

    async def _fetch(self, entry: _Entry) -> Token:
        previous = entry.token
        try:
            token = await self.source.fetch(entry.key)
        except TokenFetchError as exc:
            self._failed(entry, exc)
            raise
        now = self._clock.monotonic()
        entry.token = token
        entry.fetched_wall = self._clock.wall()
        entry.failures = 0
        entry.last_error = None
        entry.refused = False
        entry.next_attempt = 0.0
        # A static value never needs renewing: no wake-up is scheduled for it.
        entry.next_refresh = token.refresh_at(self._rng) if math.isfinite(token.lifetime) else None
        log.info(
            "token renewed" if previous is not None else "token fetched",
            extra={
                "event": "token_renewed" if previous is not None else "token_fetched",
                "upstream": self.upstream,
                "workspace": entry.key,
                "fingerprint": token.fingerprint,
                "expires_in": round(token.remaining(now), 1) if token.expires else None,
                "expires_at": round(token.wall_expires_at, 3) if token.expires else None,
            },
        )
        entry.wake.set()
        return token

    def _failed(self, entry: _Entry, exc: TokenFetchError) -> None:
        now = self._clock.monotonic()
        token = entry.token
        still_valid = token is not None and token.is_valid(now)
        entry.refused = isinstance(exc, WorkspaceRejected) and not entry.pinned
        if entry.refused:
            if not still_valid:
                self._forget_workspace(entry, exc.code, now)
                entry.wake.set()
                return
            # A workspace that was real until now: keep serving its token while it lasts.
            self._log_unknown(entry.key, exc.code, now)
        entry.failures += 1
        entry.last_error = exc.code
        delay = retry_delay(
            exc,
            entry.failures,
            min_backoff=self._settings.min_backoff,
            max_backoff=self._settings.max_backoff,
            rng=self._rng,
        )
        entry.next_attempt = now + delay
        entry.next_refresh = entry.next_attempt
        rejected = isinstance(exc, CredentialRejected) and not (
            isinstance(exc, WorkspaceRejected) and not entry.pinned
        )
        # A refused credential will not heal by itself: say so loudly, once per failure streak.
        log.log(
            logging.ERROR if rejected and entry.failures == 1 else logging.WARNING,
            "credential rejected; it will not heal by itself: check the configuration"
            if rejected
            else "token fetch failed",
            extra={
                "event": "token_fetch_failed",
                "upstream": self.upstream,
                "workspace": entry.key,
                "error_code": exc.code,
                "reason": exc.message,
                "consecutive_failures": entry.failures,
                "retry_in": round(delay, 1),
                "serving_current_token": still_valid,
                "fingerprint": token.fingerprint if token else None,
            },
        )
        entry.wake.set()

    # -- background renewal -------------------------------------------------------------------

    async def _renew_loop(self, entry: _Entry) -> None:
        """Renew ``entry`` ahead of expiry for as long as it is in use."""
        clock = self._clock
        while not self._closed:
            if entry.next_refresh is None:
                # Nothing fetched yet: wait for the first fetch to finish.
                entry.wake.clear()
                await entry.wake.wait()
                continue
            await clock.sleep(entry.next_refresh - clock.monotonic())
            now = clock.monotonic()
            if entry.next_refresh is not None and now < entry.next_refresh:
                continue  # rescheduled while we slept
            if not entry.pinned and now - entry.last_used > self._settings.idle_timeout:
                self._entries.pop(entry.key, None)
                self._retire(entry, reason="idle")
                return
            token = entry.token
            if token is not None and not token.is_valid(now):
                log.warning(
                    "token expired before it could be renewed",
                    extra={
                        "event": "token_expired",
                        "upstream": self.upstream,
                        "workspace": entry.key,
                        "fingerprint": token.fingerprint,
                    },
                )
                entry.token = None
            task = self._start_fetch(entry)
            with contextlib.suppress(TokenFetchError):  # _failed has set the next attempt
                await asyncio.shield(task)

    def _retire(self, entry: _Entry, *, reason: str) -> None:
        log.info(
            "token evicted",
            extra={
                "event": "token_evicted",
                "upstream": self.upstream,
                "workspace": entry.key,
                "reason": reason,
                "fingerprint": entry.token.fingerprint if entry.token else None,
            },
        )
        current = asyncio.current_task()
        if entry.loop is not None and entry.loop is not current:
            entry.loop.cancel()

    # -- start-up, status, shutdown -----------------------------------------------------------

    def pin(self, keys: Iterable[str]) -> None:
        """Keep ``keys`` renewed whether or not they are used, and fetch them now."""
        now = self._clock.monotonic()
        for key in keys:
            self._unknown.pop(key, None)  # a default workspace is never a client's typo
            entry = self._find(key) or self._new_entry(key, now)
            entry.pinned = True
            self._entries.pop(key, None)
            self._pinned[key] = entry
            idle = entry.token is None and self._flights.running(entry) is None
            if idle and now >= entry.next_attempt:
                self._start_fetch(entry)

    def states(self) -> list[TokenState]:
        now = self._clock.monotonic()
        states = [self._state(e, now) for e in self._all()]
        states.extend(
            TokenState(
                key=u.key,
                state="unknown_workspace",
                valid=False,
                idle_for=round(now - u.last_used, 3),
                fingerprint=None,
                expires_in=None,
                wall_expires_at=None,
                fetched_wall=None,
                next_refresh_in=None,
                consecutive_failures=0,
                last_error=u.code,
                pinned=False,
            )
            for u in self._unknown.values()
            if now < u.until
        )
        return states

    def unknown_workspaces(self) -> int:
        """How many unknown workspaces are remembered (expired ones included until purged)."""
        return len(self._unknown)

    def _state(self, e: _Entry, now: float) -> TokenState:
        t = e.token
        valid = t is not None and t.is_valid(now)
        if self._flights.running(e) is not None:
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

    async def wait_idle(self) -> None:
        """Wait until no fetch is in flight (for tests and for start-up readiness)."""
        while True:
            tasks = [t for e in self._all() if (t := self._flights.running(e)) is not None]
            if not tasks:
                return
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stop every background task and wait for them, then close the source."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.source.close()
