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
* **Unknown workspaces**: a workspace a client named that the source refuses and that has no
  valid token leaves the token cache for the negative cache of :mod:`proxy.tokens.unknown`. A
  pinned workspace refused the same way stays what it was: a configuration error readiness
  reports.

Each key's entry and the state it reports are in :mod:`proxy.tokens.entry`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from proxy.clock import Clock
from proxy.config import TokenSettings
from proxy.errors import CredentialRejected, TokenFetchError, TokenUnavailable, WorkspaceRejected
from proxy.tokens.backoff import retry_delay
from proxy.tokens.entry import Entries, Entry, TokenState, state_of
from proxy.tokens.singleflight import SingleFlight
from proxy.tokens.source import TokenSource
from proxy.tokens.token import Token
from proxy.tokens.unknown import UnknownWorkspaces

log = logging.getLogger("proxy.tokens")
_T = TypeVar("_T")

#: After an upstream rejection dropped a key's token, its replacement is not dropped again by a
#: rejection for this long: an endpoint that answers 401 whatever the token (one the user may not
#: use, chosen by the client) would otherwise cost a token renewal per request.
MIN_AGE_TO_DROP_AGAIN = 30.0


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
        self._entries = Entries(
            self._settings.max_entries, lambda entry: self._retire(entry, reason="lru")
        )
        # Pinned keys (the default workspaces readiness depends on) live outside the LRU, so no
        # amount of traffic to other workspaces can evict them.
        self._pinned: dict[str, Entry] = {}
        self._unknown = UnknownWorkspaces(
            upstream=upstream,
            max_entries=self._settings.max_entries,
            max_backoff=self._settings.max_backoff,
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        # One fetch per entry (not per key: a forgotten workspace's entry may still be fetching
        # while a new one for the same key starts), spawned as a task close() cancels.
        self._flights: SingleFlight[Entry, Token] = SingleFlight(self._spawn)
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
            self._unknown.check(key, now)
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

    async def _get_slow(self, key: str, entry: Entry | None, now: float) -> Token:
        self.misses += 1
        if entry is None:
            entry = self._new_entry(key, now)
        if self._flights.running(entry) is None and now < entry.next_attempt:
            if entry.refused and not entry.pinned:
                # Its token has run out and Royalti said the workspace is not (or no
                # longer) the user's: the client's problem from now on.
                self._forget_workspace(entry, entry.last_error or "", now)
                raise self._unknown.error()
            raise self._unavailable(entry, now)
        self.waits += 1
        try:
            return await self._flights.join(entry, lambda: self._fetch(entry))
        except TokenFetchError:
            if entry.unknown:
                raise self._unknown.error() from None
            raise self._unavailable(entry, self._clock.monotonic()) from None

    def _unavailable(self, entry: Entry, now: float) -> TokenUnavailable:
        wait = max(1.0, entry.next_attempt - now)
        return TokenUnavailable(
            "no valid token could be obtained from the token endpoint",
            retry_after=math.ceil(wait),
            details=[f"last error: {entry.last_error}"] if entry.last_error else [],
        )

    # -- unknown workspaces (proxy.tokens.unknown) --------------------------------------------

    def _forget_workspace(self, entry: Entry, code: str, now: float) -> None:
        """Move ``entry`` from the token cache to the unknown workspaces: no task, no renewal."""
        entry.unknown = True
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        current = asyncio.current_task()
        if entry.loop is not None and entry.loop is not current:
            entry.loop.cancel()
        self._unknown.remember(entry.key, last_used=entry.last_used, code=code, now=now)

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

    def _find(self, key: str) -> Entry | None:
        return self._pinned.get(key) or self._entries.get(key)

    def _all(self) -> list[Entry]:
        return [*self._pinned.values(), *self._entries.values()]

    def _new_entry(self, key: str, now: float) -> Entry:
        entry = Entry(key=key, last_used=now)
        self._entries[key] = entry
        entry.loop = self._spawn(self._renew_loop(entry))
        return entry

    def _spawn(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_fetch(self, entry: Entry) -> asyncio.Task[Token]:
        return self._flights.start(entry, lambda: self._fetch(entry))

    async def _fetch(self, entry: Entry) -> Token:
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

    def _failed(self, entry: Entry, exc: TokenFetchError) -> None:
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
            self._unknown.log(entry.key, exc.code, now)
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

    async def _renew_loop(self, entry: Entry) -> None:
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

    def _retire(self, entry: Entry, *, reason: str) -> None:
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
            self._unknown.discard(key)  # a default workspace is never a client's typo
            entry = self._find(key) or self._new_entry(key, now)
            entry.pinned = True
            self._entries.pop(key, None)
            self._pinned[key] = entry
            idle = entry.token is None and self._flights.running(entry) is None
            if idle and now >= entry.next_attempt:
                self._start_fetch(entry)

    def states(self) -> list[TokenState]:
        now = self._clock.monotonic()
        states = [
            state_of(e, now, renewing=self._flights.running(e) is not None) for e in self._all()
        ]
        states.extend(self._unknown.states(now))
        return states

    def unknown_workspaces(self) -> int:
        """How many unknown workspaces are remembered (expired ones included until purged)."""
        return len(self._unknown)

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
