"""Unit tests of the token manager against an in-memory token source: no network, and time only
moves when the test moves the injected clock."""

from __future__ import annotations

import asyncio
import random

import pytest

from proxy.clock import FakeClock, settle
from proxy.config import TokenSettings
from proxy.errors import CredentialRejected, RateLimited, TokenFetchError, TokenUnavailable
from proxy.tokens.manager import TokenManager
from proxy.tokens.source import CredentialStatus
from proxy.tokens.token import Token


class ScriptedSource:
    """Hands out ``tok-1``, ``tok-2``, ... with ``lifetime``; fails while ``failures`` has items;
    blocks each fetch until ``gate`` is set when a gate is given."""

    kind = "scripted"
    per_workspace = True

    def __init__(self, clock: FakeClock, lifetime: float = 600.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls: list[str] = []
        self.failures: list[TokenFetchError] = []
        self.gate: asyncio.Event | None = None
        self.concurrent = 0
        self.max_concurrent = 0

    async def fetch(self, key: str) -> Token:
        self.calls.append(key)
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.failures:
                raise self.failures.pop(0)
            now = self.clock.monotonic()
            return Token(f"tok-{len(self.calls)}-{key}", now, self.lifetime, now + self.lifetime)
        finally:
            self.concurrent -= 1

    def credential_status(self) -> CredentialStatus | None:
        return None

    async def close(self) -> None:
        return None


@pytest.fixture
def source(clock: FakeClock) -> ScriptedSource:
    return ScriptedSource(clock)


@pytest.fixture
async def manager(clock: FakeClock, source: ScriptedSource):
    m = TokenManager(
        upstream="u",
        source=source,
        clock=clock,
        settings=TokenSettings(idle_timeout=3600, max_entries=100),
        rng=random.Random(1),
    )
    yield m
    await m.close()


async def advance(clock: FakeClock, manager: TokenManager, seconds: float, step: float) -> None:
    end = clock.monotonic() + seconds
    while clock.monotonic() < end:
        await clock.advance(min(step, end - clock.monotonic()))
        await manager.wait_idle()


async def test_concurrent_requests_on_a_cold_key_cause_exactly_one_fetch(manager, source):
    source.gate = asyncio.Event()
    waiters = [asyncio.ensure_future(manager.get("ws")) for _ in range(200)]
    await settle()
    source.gate.set()
    tokens = await asyncio.gather(*waiters)
    assert source.calls == ["ws"]
    assert {t.value for t in tokens} == {"tok-1-ws"}
    assert manager.waits == 200


async def test_each_key_gets_its_own_single_flight_and_keys_fetch_in_parallel(manager, source):
    source.gate = asyncio.Event()
    waiters = [asyncio.ensure_future(manager.get(f"ws{i % 4}")) for i in range(200)]
    await settle()
    assert source.max_concurrent == 4  # one lock per key, not a global one
    source.gate.set()
    await asyncio.gather(*waiters)
    assert sorted(source.calls) == ["ws0", "ws1", "ws2", "ws3"]


async def test_a_warm_key_is_served_from_cache_without_waiting(manager, source):
    await manager.get("ws")
    waits = manager.waits
    for _ in range(50):
        await manager.get("ws")
    assert manager.waits == waits
    assert manager.hits == 50
    assert len(source.calls) == 1


async def test_cached_is_the_valid_cached_token_or_none_and_never_fetches(clock, manager, source):
    assert manager.cached("ws") is None  # nothing yet, and asking does not start a fetch
    assert source.calls == []
    token = await manager.get("ws")
    hits = manager.hits
    assert manager.cached("ws") is token
    assert manager.hits == hits + 1
    manager.invalidate("ws", token)
    assert manager.cached("ws") is None
    fresh = await manager.get("ws")
    source.failures = [TokenFetchError("HTTP_500", "down")] * 1000  # no renewal comes
    await advance(clock, manager, 0.9 * 600, 1)
    assert manager.cached("ws") is fresh  # still valid: served while renewals fail
    await advance(clock, manager, 0.1 * 600, 1)
    calls = len(source.calls)
    assert manager.cached("ws") is None  # expired: too late to hand out
    assert len(source.calls) == calls


async def test_refresh_ahead_renews_before_expiry_so_no_request_ever_waits(clock, manager, source):
    first = await manager.get("ws")
    waits = manager.waits
    seen = {first.value}
    for _ in range(5 * 60):  # five lifetimes, a request every 10 s
        await advance(clock, manager, 10, 10)
        token = await manager.get("ws")
        assert token.is_valid(clock.monotonic())
        seen.add(token.value)
    assert manager.waits == waits  # nobody waited after the first fetch
    assert 5 <= len(seen) <= 8  # renewed about once per lifetime, not in a loop


async def test_renewal_happens_between_three_quarters_and_the_end_of_the_lifetime(
    clock, manager, source
):
    token = await manager.get("ws")
    await advance(clock, manager, 0.74 * 600, 1)
    assert len(source.calls) == 1
    await advance(clock, manager, (0.86 - 0.74) * 600, 1)
    assert len(source.calls) == 2
    assert manager.peek("ws") != token


async def test_tokens_that_live_two_seconds_are_renewed_but_never_in_a_loop(clock, source):
    source.lifetime = 2.0
    m = TokenManager(upstream="u", source=source, clock=clock, rng=random.Random(3))
    try:
        await m.get("ws")
        await advance(clock, m, 20, 0.05)
        # renewed at 75-85 % of 2 s: about 12 renewals in 20 s, never hundreds
        assert 10 <= len(source.calls) <= 15
        assert m.peek("ws") is not None
    finally:
        await m.close()


async def test_a_failing_token_endpoint_keeps_the_current_token_until_it_expires_then_503(
    clock, manager, source
):
    token = await manager.get("ws")
    source.failures = [TokenFetchError("HTTP_500", "down")] * 1000
    # Past the refresh point: renewals fail, the current token is still served.
    await advance(clock, manager, 0.9 * 600, 1)
    assert len(source.calls) > 2  # it kept trying, with backoff
    assert (await manager.get("ws")) == token
    # Past the real expiry: 503 at once, without calling the endpoint.
    await advance(clock, manager, 0.1 * 600, 1)
    calls = len(source.calls)
    with pytest.raises(TokenUnavailable) as info:
        await manager.get("ws")
    assert info.value.retry_after >= 1
    assert info.value.code == "TOKEN_UNAVAILABLE"
    assert len(source.calls) == calls
    # The endpoint heals: the background retry brings a token back.
    source.failures = []
    await advance(clock, manager, 301, 1)
    assert (await manager.get("ws")).value != token.value


async def test_backoff_grows_exponentially_with_jitter_up_to_the_maximum(clock, source):
    source.failures = [TokenFetchError("NETWORK", "x")] * 10_000
    m = TokenManager(
        upstream="u",
        source=source,
        clock=clock,
        settings=TokenSettings(min_backoff=1, max_backoff=300),
        rng=random.Random(5),
    )
    try:
        m.pin(["ws"])
        await advance(clock, m, 3600, 0.5)
        # 1, 2, 4, ... 256, then 300 s apart: about 9 + 3300/225 attempts, never a storm
        assert 12 <= len(source.calls) <= 30
        assert m.states()[0].consecutive_failures == len(source.calls)
        assert m.states()[0].last_error == "NETWORK"
    finally:
        await m.close()


async def test_retry_after_from_the_token_endpoint_is_honoured(clock, manager, source):
    source.failures = [RateLimited("HTTP_429", "slow down", retry_after=120)]
    with pytest.raises(TokenUnavailable) as info:
        await manager.get("ws")
    assert info.value.retry_after >= 120
    await advance(clock, manager, 119, 1)
    assert len(source.calls) == 1
    with pytest.raises(TokenUnavailable):
        await manager.get("ws")
    assert len(source.calls) == 1
    await advance(clock, manager, 2, 1)
    assert len(source.calls) == 2
    assert manager.peek("ws") is not None


async def test_a_rejected_credential_is_not_retried_fast(clock, manager, source):
    source.failures = [CredentialRejected("invalid_client", "no")] * 100
    m = manager
    m.pin(["ws"])
    await advance(clock, m, 600, 1)
    assert len(source.calls) <= 3  # max_backoff (300 s) between attempts


async def test_compare_and_invalidate_drops_only_the_token_that_is_still_cached(manager, source):
    old = await manager.get("ws")
    assert manager.invalidate("ws", old) is True
    new = await manager.get("ws")
    assert new != old
    # A late rejection of the old token does not drop the new one.
    assert manager.invalidate("ws", old) is False
    assert manager.peek("ws") == new
    assert len(source.calls) == 2


async def test_a_burst_of_rejections_causes_one_renewal(manager, source):
    old = await manager.get("ws")
    source.gate = asyncio.Event()

    async def rejected() -> Token:
        manager.invalidate("ws", old)
        return await manager.get("ws")

    tasks = [asyncio.ensure_future(rejected()) for _ in range(50)]
    await settle()
    source.gate.set()
    tokens = await asyncio.gather(*tasks)
    assert len(source.calls) == 2
    assert {t.value for t in tokens} == {"tok-2-ws"}


async def test_idle_workspaces_stop_being_renewed_and_drop_out(clock, source):
    m = TokenManager(
        upstream="u",
        source=source,
        clock=clock,
        settings=TokenSettings(idle_timeout=900),
        rng=random.Random(2),
    )
    try:
        await m.get("busy")
        await m.get("idle")
        for _ in range(180):  # 30 minutes; only "busy" is used
            await advance(clock, m, 10, 10)
            await m.get("busy")
        assert [s.key for s in m.states()] == ["busy"]
        calls = source.calls.count("idle")
        await advance(clock, m, 3600, 10)
        assert source.calls.count("idle") == calls
    finally:
        await m.close()


async def test_pinned_keys_are_fetched_at_once_and_never_dropped_as_idle(clock, source):
    m = TokenManager(
        upstream="u", source=source, clock=clock, settings=TokenSettings(idle_timeout=60)
    )
    try:
        m.pin(["default"])
        await m.wait_idle()
        assert source.calls == ["default"]
        await advance(clock, m, 3 * 600, 10)
        assert m.peek("default") is not None
        assert m.waits == 0
    finally:
        await m.close()


async def test_the_cache_is_bounded_and_evicts_least_recently_used(clock, source):
    m = TokenManager(
        upstream="u", source=source, clock=clock, settings=TokenSettings(max_entries=3)
    )
    try:
        for key in ("a", "b", "c", "a", "d"):
            await m.get(key)
        assert sorted(s.key for s in m.states()) == ["a", "c", "d"]
        await settle()
        # the evicted key's renewal task is gone too: one loop per live key
        assert clock.sleepers == 3
    finally:
        await m.close()


async def test_a_client_that_gives_up_does_not_cancel_the_fetch_for_others(manager, source):
    source.gate = asyncio.Event()
    impatient = asyncio.ensure_future(manager.get("ws"))
    patient = asyncio.ensure_future(manager.get("ws"))
    await settle()
    impatient.cancel()
    await settle()
    source.gate.set()
    assert (await patient).value == "tok-1-ws"
    assert len(source.calls) == 1


async def test_token_states_show_fingerprints_and_never_token_values(clock, manager, source):
    token = await manager.get("ws")
    (state,) = manager.states()
    assert state.fingerprint == token.fingerprint
    assert state.state == "valid"
    assert token.value not in repr(state)
    assert state.next_refresh_in is not None
    assert 0.5 * 600 <= state.next_refresh_in <= 600


async def test_close_stops_every_background_task(clock, source):
    m = TokenManager(upstream="u", source=source, clock=clock)
    for key in ("a", "b"):
        await m.get(key)
    await m.close()
    await settle()
    assert clock.sleepers == 0
