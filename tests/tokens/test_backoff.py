"""The delay after a failed token call: exponential with equal jitter, capped, the maximum for a
rejected credential, never shorter than Retry-After."""

from __future__ import annotations

import random

import pytest

from proxy.errors import CredentialRejected, RateLimited, TokenFetchError
from proxy.tokens.backoff import retry_delay


def delay(exc: TokenFetchError, failures: int, seed: int = 0) -> float:
    return retry_delay(exc, failures, min_backoff=1.0, max_backoff=60.0, rng=random.Random(seed))


@pytest.mark.parametrize(("failures", "ceiling"), [(1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0)])
def test_the_delay_is_between_half_and_all_of_the_doubling_ceiling(
    failures: int, ceiling: float
) -> None:
    delays = [delay(TokenFetchError("NETWORK", "down"), failures, seed) for seed in range(50)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(set(delays)) > 1  # jittered: replicas do not retry in lockstep


def test_a_huge_failure_count_stays_at_the_maximum() -> None:
    assert 30.0 <= delay(TokenFetchError("NETWORK", "down"), 10_000) <= 60.0


def test_a_rejected_credential_waits_the_maximum_at_once() -> None:
    assert delay(CredentialRejected("HTTP_401", "rejected"), 1) == 60.0


def test_retry_after_lengthens_the_delay_but_never_shortens_it() -> None:
    assert delay(RateLimited("HTTP_429", "slow down", retry_after=90.0), 1) == 90.0
    assert 30.0 <= delay(RateLimited("HTTP_429", "slow down", retry_after=0.1), 10) <= 60.0
