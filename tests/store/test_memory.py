"""The in-memory shared store: Redis's leases, fencing and expiry on the injected clock, and an
outage modelled by switching its backend off. (The guarantees it shares with Redis run against
both in test_shared_store.py; these are the ones only a clock can show in milliseconds.)"""

from __future__ import annotations

import logging
import socket

import aiohttp
import pytest

from proxy.app import Proxy
from proxy.clock import FakeClock
from proxy.config import build
from proxy.fakes.royalti import FakeRoyalti
from proxy.store.memory import GRACE, MemoryBackend, MemoryStore
from proxy.store.records import StoreUnavailable
from proxy.tokens.shared import SharedSource
from tests.conftest import WS, royalti_config


async def run_all(clock: FakeClock, proxies: list[Proxy], seconds: float, step: float) -> None:
    """Move the one clock every replica shares forward, letting every renewal finish."""
    end = clock.monotonic() + seconds
    while clock.monotonic() < end:
        await clock.advance(min(step, end - clock.monotonic()))
        for p in proxies:
            for m in p.managers.values():
                await m.wait_idle()


@pytest.fixture
def backend(clock: FakeClock) -> MemoryBackend:
    return MemoryBackend(clock)


async def test_a_lease_expires_on_the_clock_and_then_another_replica_takes_it(
    clock: FakeClock, backend: MemoryBackend
) -> None:
    a, b = MemoryStore(backend, lease=2.0), MemoryStore(backend, lease=2.0)
    names = a.names("token", "up:acct:ws")
    held = await a.acquire(names)
    assert held is not None
    await clock.advance(1.9)
    assert await b.acquire(names) is None
    assert (await b.snapshot(names)).locked
    await clock.advance(0.1)
    assert not (await b.snapshot(names)).locked
    assert await b.acquire(names) is not None
    assert not await a.extend(held)  # compare-and-expire: no longer ours


async def test_a_value_expires_but_its_version_outlives_it_by_the_grace(
    clock: FakeClock, backend: MemoryBackend
) -> None:
    store = MemoryStore(backend)
    names = store.names("token", "s")
    lease = await store.acquire(names)
    assert lease is not None
    assert await store.write(lease, version=0, payload={"v": "t"}, life=10) == 1
    await clock.advance(10)
    record = (await store.snapshot(names)).record
    assert (record.version, record.remaining, record.payload) == (1, 0.0, {"v": "t"})
    await clock.advance(GRACE)
    record = (await store.snapshot(names)).record
    assert (record.version, record.payload) == (0, None)
    assert record.remaining < 0


async def test_marking_spent_leaves_no_payload_and_a_failure_note_lasts_its_hold(
    clock: FakeClock, backend: MemoryBackend
) -> None:
    store = MemoryStore(backend)
    names = store.names("credential", "s")
    lease = await store.acquire(names)
    assert lease is not None
    assert await store.write(lease, version=0, payload={"v": "rt"}, life=100) == 1
    assert await store.write(lease, version=1, payload=None, life=100) == 2
    assert (await store.snapshot(names)).record.payload is None
    await store.release(lease, failure={"code": "HTTP_429"}, failure_ttl=1.5)
    snap = await store.snapshot(names)
    assert (snap.locked, snap.failure) == (False, {"code": "HTTP_429"})
    await clock.advance(1.5)
    assert (await store.snapshot(names)).failure is None


async def test_a_payload_read_is_a_copy_not_the_writers_object(backend: MemoryBackend) -> None:
    store = MemoryStore(backend)
    names = store.names("token", "s")
    lease = await store.acquire(names)
    assert lease is not None
    payload = {"v": "t", "x": {"n": 1}}
    await store.write(lease, version=0, payload=payload, life=10)
    payload["x"]["n"] = 2
    assert (await store.snapshot(names)).record.payload == {"v": "t", "x": {"n": 1}}


async def test_an_outage_fails_every_call_logs_once_and_recovers_on_the_first_answer(
    backend: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.store")
    store = MemoryStore(backend)
    names = store.names("token", "s")
    assert await store.ping()
    backend.down = True
    assert not await store.ping()
    with pytest.raises(StoreUnavailable) as info:
        lease = await store.acquire(names)
    assert not info.value.maybe_applied
    assert store.degraded and store.errors["connection"] == 2
    assert store.status_note() is not None
    backend.down = False
    lease = await store.acquire(names)
    assert lease is not None
    backend.down = True
    with pytest.raises(StoreUnavailable) as info:
        await store.write(lease, version=0, payload={"v": "t"}, life=1)
    assert info.value.maybe_applied  # a write's fate is unknown: never keep it locally too
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events.count("token_store_degraded") == 2
    assert events.count("token_store_recovered") == 1


async def test_replicas_ride_out_a_store_outage_locally_and_share_again_on_the_clock(
    clock: FakeClock,
    backend: MemoryBackend,
    fake: FakeRoyalti,
    fake_url: str,
    http: aiohttp.ClientSession,
) -> None:
    """The in-process, clock-driven form of the five-process outage test: tokens of 600 s are
    renewed locally through an outage longer than their life, then shared again."""
    config = build(royalti_config(fake_url, default_workspace=WS[0]), {}, source="test")
    proxies = [Proxy(config, clock=clock, store=MemoryStore(backend)) for _ in range(3)]
    try:
        for p in proxies:
            await p.start()
        await run_all(clock, proxies, 1, step=1)
        assert (fake.login_calls, fake.authtoken_calls[WS[0]]) == (1, 1)

        backend.down = True
        await run_all(clock, proxies, 1200, step=60)  # two token lifetimes without the store
        for p in proxies:
            async with http.get(
                p.addresses["proxy"] + "/user/", headers={"X-Royalti-Workspace": WS[0]}
            ) as resp:
                assert resp.status == 200
            assert p.readiness() == []  # degraded is not unready
            assert p.store is not None and p.store.degraded
            source = p.managers["royalti"].source
            assert isinstance(source, SharedSource) and source.outcomes["local"] >= 1
        assert fake.login_calls == 1  # each replica's copy of the refresh token carried it

        backend.down = False
        await run_all(clock, proxies, 600, step=60)
        for p in proxies:
            assert p.store is not None and not p.store.degraded
        shared_again = sum(
            s.outcomes["renewed"] + s.outcomes["shared"]
            for s in (p.managers["royalti"].source for p in proxies)
            if isinstance(s, SharedSource)
        )
        assert shared_again > 3  # beyond the three start-up fetches
    finally:
        for p in proxies:
            await p.stop()


class ClosingStore(MemoryStore):
    """A memory store that counts how often it is closed."""

    closes = 0

    async def close(self) -> None:
        self.closes += 1


async def test_stopping_closes_the_store_once_after_the_listeners(
    clock: FakeClock, backend: MemoryBackend, fake_url: str
) -> None:
    store = ClosingStore(backend)
    proxy = Proxy(
        build(royalti_config(fake_url, default_workspace=WS[0]), {}, source="test"),
        clock=clock,
        store=store,
    )
    await proxy.start()
    assert store.closes == 0
    await proxy.stop()
    assert store.closes == 1


async def test_a_start_that_fails_half_way_closes_the_store_it_had_opened(
    clock: FakeClock, backend: MemoryBackend, fake_url: str
) -> None:
    store = ClosingStore(backend)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    data = royalti_config(fake_url, default_workspace=WS[0])
    data["listen"] = f"127.0.0.1:{taken.getsockname()[1]}"
    proxy = Proxy(build(data, {}, source="test"), clock=clock, store=store)
    try:
        with pytest.raises(OSError, match="in use"):
            await proxy.start()
    finally:
        taken.close()
    assert store.closes == 1


async def test_a_lease_that_cannot_be_extended_for_a_whole_lease_is_lost(
    clock: FakeClock, backend: MemoryBackend
) -> None:
    store = MemoryStore(backend, lease=3.0)
    lease = await store.acquire(store.names("token", "s"))
    assert lease is not None
    async with store.keep(lease):
        await clock.advance(2, step=1)
        assert not lease.lost  # extended at 1 s and 2 s
        backend.down = True
        await clock.advance(2, step=1)
        assert not lease.lost  # 2 s without an extension: the lease may still be ours
        await clock.advance(3, step=1)
        assert lease.lost
