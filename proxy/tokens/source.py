"""The one seam between the token manager and the ways of getting a token."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from proxy.errors import TokenFetchError
from proxy.tokens.token import Token

T = TypeVar("T")

#: The cache key used by sources whose credential does not depend on a workspace.
SINGLE_KEY = "-"


@dataclass(frozen=True, slots=True)
class CredentialStatus:
    """What a source knows about the long-lived credential behind its tokens (for example
    Royalti's refresh token), for logs, metrics and the token-status endpoint."""

    kind: str
    fingerprint: str | None
    wall_expires_at: float | None
    renewable: bool
    last_error: str | None = None


class TokenSource(Protocol):
    """Gets a fresh token for one cache key (a Royalti workspace, or :data:`SINGLE_KEY`).

    ``fetch`` is never called twice at once for the same key (the manager single-flights it); it
    raises :class:`proxy.errors.TokenFetchError` when no token could be had.
    """

    #: label for metrics and logs: ``royalti``, ``oauth2_password``, ``static``, ...
    kind: str

    #: True when tokens are scoped per workspace and the request must name one.
    per_workspace: bool

    async def fetch(self, key: str) -> Token: ...

    def credential_status(self) -> CredentialStatus | None:
        """The long-lived credential's state, or None when there is none."""
        ...

    async def close(self) -> None:
        """Release what the source holds (background tasks)."""
        ...


class FetchObserver(Protocol):
    """Told about every call to a token endpoint: which kind of call (``login``, ``access``,
    ``refresh``, ``password``, ``client_credentials``), its outcome (``success`` or an error
    code) and how long it took. The metrics module implements it."""

    def __call__(self, kind: str, outcome: str, seconds: float, /) -> None: ...


def ignore(kind: str, outcome: str, seconds: float) -> None:
    """The observer of a source nobody observes."""


async def observed(observer: FetchObserver, kind: str, call: Awaitable[T]) -> T:
    """Await one token-endpoint call and report its outcome and duration to ``observer``."""
    start = time.perf_counter()
    try:
        result = await call
    except TokenFetchError as exc:
        observer(kind, exc.code, time.perf_counter() - start)
        raise
    observer(kind, "success", time.perf_counter() - start)
    return result
