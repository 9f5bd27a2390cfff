"""How long to wait after a failed call to a token endpoint."""

from __future__ import annotations

import random

from proxy.errors import CredentialRejected, TokenFetchError


def retry_delay(
    exc: TokenFetchError,
    failures: int,
    *,
    min_backoff: float,
    max_backoff: float,
    rng: random.Random,
) -> float:
    """Seconds before the next attempt after ``failures`` consecutive failures.

    Exponential with "equal jitter" (half fixed, half random) between ``min_backoff`` and
    ``max_backoff``; a rejected credential, which will not heal by itself, waits the maximum; never
    shorter than the server's ``Retry-After`` (RFC 9110 §10.2.3).
    """
    if isinstance(exc, CredentialRejected):
        delay = max_backoff
    else:
        ceiling = min(max_backoff, min_backoff * float(2 ** min(failures - 1, 30)))
        delay = ceiling / 2 + rng.uniform(0, ceiling / 2)
    if exc.retry_after is not None:
        delay = max(delay, exc.retry_after)
    return delay
