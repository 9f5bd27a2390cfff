"""Unknown workspaces: the :class:`~proxy.tokens.manager.TokenManager`'s negative cache.

A workspace a client named that the source refuses (:class:`~proxy.errors.WorkspaceRejected`)
and that has no valid token is the client's mistake, not a configuration error. It is remembered
here, away from the token cache (no entry, no background renewal, no task), bounded by
``max_entries`` and for ``max_backoff``, and requests for it get
:class:`~proxy.errors.UnknownWorkspace` without an upstream call. Their log lines are bounded too:
a client can name any number of workspaces.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

from proxy.errors import UnknownWorkspace
from proxy.tokens.entry import TokenState

log = logging.getLogger("proxy.tokens")

#: A workspace id longer than this is refused as unknown without asking the upstream: Royalti's
#: are 36-character UUIDs, and a client-chosen key is kept in memory and sent as a query.
MAX_WORKSPACE_LENGTH = 128
#: Unknown-workspace log lines named per ``max_backoff`` interval; the rest are counted.
UNKNOWN_LOG_BURST = 10


@dataclass(slots=True, eq=False)
class _Unknown:
    """A workspace the source refused, remembered so that asking again costs nothing."""

    key: str
    until: float
    last_used: float
    code: str


class UnknownWorkspaces:
    """The workspaces of one upstream that the source refused, each for ``max_backoff``."""

    def __init__(self, *, upstream: str, max_entries: int, max_backoff: float) -> None:
        self._upstream = upstream
        self._max_entries = max_entries
        self._max_backoff = max_backoff
        # Oldest first (all are remembered for the same time, so insertion order is expiry
        # order): purged from the front, bounded like the token cache.
        self._unknown: OrderedDict[str, _Unknown] = OrderedDict()
        self._logged = 0
        self._suppressed = 0
        self._log_window = -math.inf

    def __len__(self) -> int:
        """How many are remembered (expired ones included until purged)."""
        return len(self._unknown)

    def check(self, key: str, now: float) -> None:
        """Raise :class:`UnknownWorkspace` when ``key`` is known to be unknown (or cannot be a
        workspace id); forget it once its time is up, so the next request asks again."""
        if len(key) > MAX_WORKSPACE_LENGTH:
            raise self.error()
        known = self._unknown.get(key)
        if known is None:
            return
        if now < known.until:
            known.last_used = now
            raise self.error()
        del self._unknown[key]

    def error(self) -> UnknownWorkspace:
        return UnknownWorkspace(
            "unknown workspace: Royalti does not know it, or it is not this user's",
            details=[f"not asked for again before {math.ceil(self._max_backoff)} s"],
        )

    def remember(self, key: str, *, last_used: float, code: str, now: float) -> None:
        """Remember ``key`` as refused with error ``code``, and say so (within the bound)."""
        unknown = self._unknown
        while unknown:
            oldest = next(iter(unknown.values()))
            if oldest.until > now and len(unknown) < self._max_entries:
                break
            unknown.popitem(last=False)
        unknown.pop(key, None)
        unknown[key] = _Unknown(
            key=key, until=now + self._max_backoff, last_used=last_used, code=code
        )
        self.log(key, code, now)

    def discard(self, key: str) -> None:
        self._unknown.pop(key, None)

    def log(self, key: str, code: str, now: float) -> None:
        """Log that ``key`` was refused: a bounded number of lines per ``max_backoff``."""
        if now - self._log_window >= self._max_backoff:
            self._log_window = now
            self._logged = 0
        if self._logged >= UNKNOWN_LOG_BURST:
            self._suppressed += 1
            return
        self._logged += 1
        suppressed, self._suppressed = self._suppressed, 0
        log.warning(
            "a client asked for an unknown workspace (or one that is not this user's)",
            extra={
                "event": "unknown_workspace",
                "upstream": self._upstream,
                "workspace": key,
                "error_code": code,
                "remembered_for": self._max_backoff,
                "suppressed": suppressed,
            },
        )

    def states(self, now: float) -> list[TokenState]:
        """The ones still remembered at ``now``, as the token-status endpoint shows them."""
        return [
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
        ]
