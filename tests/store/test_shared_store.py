"""The shared token store (``token_store: {type: redis}``) against a real ``redis-server``.

Replicas share one login, one access token per workspace and one rotating refresh token chain;
exactly one renews a given token at a time; a replica whose lease expired cannot overwrite the
newer value; values are encrypted and bound to their key; a Redis that is down or slow makes
each replica renew locally within the store's timeout, and they share again once it is back.

The tests of leases, fencing and rotation run twice: against the in-memory store (leases on the
injected clock, in milliseconds) and against Redis (:class:`~tests.store_helpers.StoreKind`).
In-process tests run several :class:`~proxy.app.Proxy` instances (each with its own Redis
connections) on the injected clock; the last tests run five real ``python -m proxy run``
processes against one Redis and one fake upstream, with token lifetimes of a few seconds.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography.fernet import Fernet
from redis.asyncio import Redis

from proxy.app import Proxy
from proxy.clock import FakeClock
from proxy.config import build
from proxy.errors import ConfigError
from proxy.fakes.oauth2 import FakeOAuth2, start_fake_oauth2
from proxy.fakes.royalti import FakeRoyalti, start_fake
from proxy.store.memory import MemoryBackend
from proxy.tokens.shared import SharedSource
from tests.binaries import require_binary
from tests.conftest import ROOT, WS, ProxyFactory, royalti_config
from tests.store_helpers import (
    RedisServer,
    Replica,
    StoreKind,
    poll,
    start_replicas,
    stop_all,
)

USER, PASSWORD = "agent", "agent-password"
PREFIX = "t"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def redis_bin() -> str:
    return require_binary("redis-server")


@pytest.fixture
def redis_server(redis_bin: str, tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(redis_bin, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client, to look at (and tamper with) what the proxy wrote."""
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture(params=["memory", "redis"])
def kind(request: pytest.FixtureRequest, clock: FakeClock, key: str) -> StoreKind:
    """The store implementation a test of leases and fencing runs against."""
    if request.param == "memory":
        return StoreKind("memory", clock, key, memory=MemoryBackend(clock))
    return StoreKind("redis", clock, key, redis=request.getfixturevalue("redis_server"))


@pytest.fixture
async def raw_of(kind: StoreKind) -> AsyncIterator[Redis | None]:
    """A plain client on the Redis under test; None for the memory store."""
    if kind.redis is None:
        yield None
        return
    client = Redis.from_url(kind.redis.url)
    yield client
    await client.aclose()


StartShared = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start_shared(
    kind: StoreKind, start_proxy: ProxyFactory, clock: FakeClock
) -> AsyncIterator[StartShared]:
    """``await start_shared(config, lease=...)``: a proxy sharing tokens through the store
    under test (``token_store`` for Redis, an injected :class:`MemoryStore` otherwise)."""
    started: list[Proxy] = []

    async def factory(config: dict[str, Any], *, lease: float | None = None) -> Proxy:
        if kind.redis is not None:
            extra = {"lease": f"{round(lease * 1000)}ms"} if lease is not None else {}
            store = store_config(kind.redis.url, kind.key, **extra)
            return await start_proxy({**config, "token_store": store})
        built = build(copy.deepcopy(config), {}, source="test")
        store_ = kind.store(lease=lease if lease is not None else 15.0, prefix=PREFIX)
        proxy = Proxy(built, clock=clock, store=store_)
        await proxy.start()
        started.append(proxy)
        return proxy

    yield factory
    for proxy in reversed(started):
        await proxy.stop()


def store_config(url: str, key: str, **extra: Any) -> dict[str, Any]:
    # Several proxies share this test's event loop, and each one's start-up blocks it for a
    # while (TLS contexts): a timeout that fits one proxy per process would fire here by chance.
    # The test of the timeout itself sets its own.
    settings = {"type": "redis", "url": url, "encryption_key": key, "key_prefix": PREFIX}
    return {**settings, "timeout": "2s", **extra}


def royalti_shared(fake_url: str, url: str, key: str, **store: Any) -> dict[str, Any]:
    config = royalti_config(fake_url, default_workspace=WS[0])
    config["token_store"] = store_config(url, key, **store)
    return config


def vbot_config(oauth_url: str) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "upstreams": [
            {
                "name": "vbot",
                "url": f"{oauth_url}/api",
                "path_prefix": "/vbot/",
                "auth": {
                    "type": "oauth2_password",
                    "token_url": f"{oauth_url}/token",
                    "username": USER,
                    "password": PASSWORD,
                },
            }
        ],
    }


async def status(http: aiohttp.ClientSession, proxy: Proxy, path: str, ws: str = WS[0]) -> int:
    async with http.get(
        proxy.addresses["proxy"] + path, headers={"X-Royalti-Workspace": ws}
    ) as resp:
        await resp.read()
        return resp.status


async def idle(*proxies: Proxy) -> None:
    for p in proxies:
        for m in p.managers.values():
            await m.wait_idle()


def shared(proxy: Proxy, upstream: str = "royalti") -> SharedSource:
    source = proxy.managers[upstream].source
    assert isinstance(source, SharedSource)
    return source


class Gate:
    """Holds the next call to the token endpoint until released: a slow renewal."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.armed and request.path == "/token":
            self.armed = False
            self.entered.set()
            await self.release.wait()
        response: web.StreamResponse = await handler(request)
        return response


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def oauth(clock: FakeClock) -> FakeOAuth2:
    return FakeOAuth2(clients={}, users={USER: PASSWORD}, wall=clock.wall)


@pytest.fixture
async def oauth_url(oauth: FakeOAuth2, gate: Gate) -> AsyncIterator[str]:
    oauth.app.middlewares.append(gate.middleware)
    runner, url = await start_fake_oauth2(oauth)
    yield url
    await runner.cleanup()


# -- the store's own guarantees ---------------------------------------------------------------


async def test_a_replica_whose_lease_expired_can_neither_write_nor_release_the_new_holders_lease(
    kind: StoreKind, raw_of: Redis | None
) -> None:
    store = kind.store()
    try:
        names = store.names("token", "up:acct:ws")
        old = await store.acquire(names)
        assert old is not None
        assert await store.acquire(names) is None  # SET NX: one holder at a time
        await kind.expire_locks(raw_of, f"{PREFIX}:")  # what expiry does to a stalled holder
        new = await store.acquire(names)
        assert new is not None
        assert await store.write(new, version=0, payload={"v": "new"}, life=60) == 1
        assert await store.write(old, version=0, payload={"v": "old"}, life=60) is None
        assert old.lost
        assert not await store.extend(old)
        await store.release(old)  # compare-and-delete: not the new holder's lease
        snap = await store.snapshot(names)
        assert snap.locked
        assert snap.record.payload == {"v": "new"}
        # Even the lease holder cannot write over a version it did not read.
        assert await store.write(new, version=0, payload={"v": "stale read"}, life=60) is None
        assert await store.write(new, version=1, payload={"v": "newer"}, life=60) == 2
        assert 59 < (await store.snapshot(names)).record.remaining <= 60
    finally:
        await store.close()


async def test_a_holder_that_is_alive_keeps_its_lease_however_long_the_renewal_takes(
    kind: StoreKind,
) -> None:
    store = kind.store(lease=0.3)
    try:
        names = store.names("token", "up:acct:ws")
        lease = await store.acquire(names)
        assert lease is not None
        async with store.keep(lease):
            for _ in range(8):  # 0.8 s: well past the 0.3 s lease
                await kind.elapse(0.1)
                assert await store.acquire(names) is None
        assert not lease.lost
        await store.release(lease)
        assert not (await store.snapshot(names)).locked
    finally:
        await store.close()


async def test_a_replica_that_died_holding_the_lease_delays_the_others_by_at_most_the_lease(
    start_shared: StartShared,
    kind: StoreKind,
    fake: FakeRoyalti,
    fake_url: str,
    raw_of: Redis | None,
) -> None:
    proxy = await start_shared(royalti_config(fake_url), lease=0.5)
    source = shared(proxy)
    names = source.store.names("token", f"{source.scope}:{WS[1]}")
    await kind.plant_lock(raw_of, names, 0.5)
    token, took = await kind.timed(proxy.managers["royalti"].get(WS[1]))
    assert 0.3 < took < 0.5 + 1.0
    assert token.value
    assert fake.authtoken_calls[WS[1]] == 1
    assert source.outcomes["renewed"] == 1


async def test_values_are_encrypted_and_a_value_copied_to_another_key_reads_as_absent(
    start_proxy: ProxyFactory,
    fake: FakeRoyalti,
    fake_url: str,
    redis_server: RedisServer,
    raw: Redis,
    key: str,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await start_proxy(royalti_shared(fake_url, redis_server.url, key))
    await idle(proxy)
    token = proxy.managers["royalti"].peek(WS[0])
    assert token is not None
    source = shared(proxy)
    names = [n async for n in raw.scan_iter(f"{PREFIX}:*")]
    assert len(names) == 2  # the access token and the refresh token
    for name in names:
        for field_value in (await raw.hgetall(name)).values():
            assert token.value.encode() not in field_value
            assert b"eyJ" not in field_value  # no JWT at all in the clear
    mine = source.store.names("token", f"{source.scope}:{WS[0]}")
    theirs = source.store.names("token", f"{source.scope}:{WS[1]}")
    await raw.hset(theirs.value, mapping=await raw.hgetall(mine.value))
    await raw.pexpire(theirs.value, 600_000)

    assert await status(http, proxy, "/user/", WS[1]) == 200
    assert fake.authtoken_calls[WS[1]] == 1  # not fooled into sending WS[0]'s token
    assert fake.tokens_seen[-1] != f"Bearer {token.value}"
    assert source.store.errors["unreadable"] >= 1


async def test_a_replica_with_the_next_key_first_reads_values_written_with_the_old_one(
    start_proxy: ProxyFactory, fake: FakeRoyalti, fake_url: str, redis_server: RedisServer
) -> None:
    old = Fernet.generate_key().decode()
    new = Fernet.generate_key().decode()
    a = await start_proxy(royalti_shared(fake_url, redis_server.url, old))
    await idle(a)
    b = await start_proxy(royalti_shared(fake_url, redis_server.url, f"{new}, {old}"))
    await idle(b)
    assert shared(b).outcomes["shared"] == 1
    assert (fake.login_calls, fake.authtoken_calls[WS[0]]) == (1, 1)


async def test_a_bad_encryption_key_is_refused_by_check_config_naming_the_key_not_its_value(
    fake_url: str, redis_server: RedisServer
) -> None:
    with pytest.raises(ConfigError) as info:
        build(royalti_shared(fake_url, redis_server.url, "not-a-fernet-key"), {}, source="test")
    assert "token_store.encryption_key" in str(info.value)
    assert "not-a-fernet-key" not in str(info.value)


# -- replicas in one process ------------------------------------------------------------------


async def test_five_replicas_cold_start_under_load_log_in_once_and_fetch_each_workspace_once(
    start_shared: StartShared,
    fake: FakeRoyalti,
    fake_url: str,
    http: aiohttp.ClientSession,
) -> None:
    config = royalti_config(fake_url, default_workspace=WS[0])
    proxies = await asyncio.gather(*(start_shared(config) for _ in range(5)))
    statuses = await asyncio.gather(
        *(status(http, p, "/user/", ws) for p in proxies for ws in WS for _ in range(5))
    )
    assert set(statuses) == {200}
    assert fake.login_calls == 1
    assert fake.authtoken_calls == dict.fromkeys(WS, 1)
    outcomes = [shared(p).outcomes for p in proxies]
    assert sum(o["renewed"] for o in outcomes) == len(WS)
    assert sum(o["local"] + o["fenced"] + o["unshared"] for o in outcomes) == 0


async def test_a_failed_login_is_shared_so_other_replicas_do_not_each_hit_the_rate_limit(
    start_shared: StartShared, fake: FakeRoyalti, fake_url: str
) -> None:
    fake.login_failures = [(429, 30)]
    config = royalti_config(fake_url, default_workspace=WS[0])
    proxies = await asyncio.gather(*(start_shared(config) for _ in range(5)))
    await idle(*proxies)
    assert fake.login_calls == 1
    for p in proxies:
        (state,) = p.managers["royalti"].states()
        assert state.last_error == "HTTP_429"
        assert state.next_refresh_in is not None and state.next_refresh_in >= 30


async def test_oauth2_rotation_across_three_replicas_never_sends_a_refresh_token_twice(
    start_shared: StartShared,
    clock: FakeClock,
    oauth: FakeOAuth2,
    oauth_url: str,
    http: aiohttp.ClientSession,
) -> None:
    config = vbot_config(oauth_url)
    proxies = [await start_shared(config) for _ in range(3)]
    await idle(*proxies)
    for i in range(5 * 30):  # five 899 s lifetimes, a request every 30 s
        await clock.advance(30, step=10)
        await idle(*proxies)
        assert await status(http, proxies[i % 3], "/vbot/x") == 200
    assert oauth.calls["password"] == 1
    assert 5 <= oauth.calls["refresh_token"] <= 8
    assert oauth.reused_refresh_tokens == 0
    sent = [f["refresh_token"] for f in oauth.forms if f.get("grant_type") == "refresh_token"]
    assert len(sent) == len(set(sent))


async def test_lease_expiry_during_a_slow_renewal_does_not_let_both_renewals_win(
    start_shared: StartShared,
    kind: StoreKind,
    oauth: FakeOAuth2,
    oauth_url: str,
    gate: Gate,
    raw_of: Redis | None,
) -> None:
    config = vbot_config(oauth_url)
    a, b = await start_shared(config), await start_shared(config)
    await idle(a, b)
    source_a, source_b = shared(a, "vbot"), shared(b, "vbot")
    assert oauth.calls["password"] == 1  # b adopted a's token

    gate.armed = True
    slow = asyncio.ensure_future(source_a.fetch("-"))  # a renews: its refresh grant hangs
    await asyncio.wait_for(gate.entered.wait(), 5)
    # a stalls past its leases (a GC pause, a partition): they expire.
    await kind.expire_locks(raw_of, f"{PREFIX}:")
    won = await source_b.fetch("-")  # b takes over: the refresh token a sent is not sent again
    gate.release.set()
    late = await asyncio.wait_for(slow, 5)

    assert late.value != won.value
    assert source_b.outcomes["renewed"] == 1
    assert source_a.outcomes["fenced"] == 1  # a's writes were refused
    assert oauth.reused_refresh_tokens == 0
    # The store holds b's token: a newcomer adopts it.
    c = await start_shared(config)
    await idle(c)
    token_c = c.managers["vbot"].peek("-")
    assert token_c is not None and token_c.value == won.value
    # The chain goes on from b's refresh token; a's orphan is never sent.
    assert (await source_a.fetch("-")).value == won.value  # adopted, no call
    await source_b.fetch("-")
    assert oauth.calls["refresh_token"] == 2
    assert oauth.reused_refresh_tokens == 0


async def test_redis_down_renews_locally_stays_ready_logs_once_and_shares_again_when_back(
    start_proxy: ProxyFactory,
    clock: FakeClock,
    fake: FakeRoyalti,
    fake_url: str,
    redis_bin: str,
    tmp_path: Path,
    key: str,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = RedisServer(redis_bin, tmp_path)  # not started yet
    caplog.set_level(logging.INFO, logger="proxy.store")
    try:
        proxy = await start_proxy(royalti_shared(fake_url, server.url, key))
        await idle(proxy)
        assert await status(http, proxy, "/user/") == 200
        assert proxy.readiness() == []  # degraded is not unready
        registry = proxy.registry
        assert registry.get_sample_value("royalti_proxy_token_store_degraded") == 1
        assert registry.get_sample_value(
            "royalti_proxy_token_store_errors_total", {"reason": "connection"}
        )
        assert shared(proxy).outcomes["local"] == 1

        server.start()
        await clock.advance(2)  # past the probe interval
        assert await status(http, proxy, "/user/", WS[1]) == 200
        assert registry.get_sample_value("royalti_proxy_token_store_degraded") == 0
        assert (
            registry.get_sample_value(
                "royalti_proxy_token_store_fetches_total",
                {"upstream": "royalti", "outcome": "renewed"},
            )
            == 1
        )
        events = [getattr(r, "event", None) for r in caplog.records]
        assert events.count("token_store_degraded") == 1
        assert events.count("token_store_recovered") == 1
    finally:
        server.stop()


async def test_a_redis_that_never_answers_costs_a_request_at_most_the_store_timeout(
    start_proxy: ProxyFactory,
    clock: FakeClock,
    fake: FakeRoyalti,
    fake_url: str,
    key: str,
    http: aiohttp.ClientSession,
) -> None:
    async def black_hole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, reads, never answers
        writer.close()

    hole = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    port = hole.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy(
            royalti_shared(fake_url, f"redis://127.0.0.1:{port}/0", key, timeout="200ms")
        )
        await idle(proxy)
        await clock.advance(2)  # past the probe interval: the next fetch asks Redis again
        started = time.monotonic()
        assert await status(http, proxy, "/user/", WS[1]) == 200  # a cold workspace
        assert time.monotonic() - started < 0.2 + 0.3
        assert proxy.store is not None and proxy.store.errors["timeout"] >= 2
    finally:
        hole.close()


def readme_acl_rule() -> str:
    """The ``ACL SETUSER`` line the docs give operators (docs/deployment.md)."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    match = re.search(r"^ACL SETUSER (royalti-proxy .+)$", text, re.MULTILINE)
    assert match, "docs/deployment.md has no ACL SETUSER line"
    return match.group(1)


async def test_the_readmes_acl_rule_is_all_the_proxy_needs(
    start_proxy: ProxyFactory,
    fake: FakeRoyalti,
    fake_url: str,
    redis_bin: str,
    tmp_path: Path,
    key: str,
) -> None:
    rule = readme_acl_rule().replace(">CHANGE-ME", ">acl-pw")
    server = RedisServer(redis_bin, tmp_path, extra=["user default off", f"user {rule}"])
    server.start()
    try:
        url = f"redis://royalti-proxy:acl-pw@127.0.0.1:{server.port}/0"
        config = royalti_shared(fake_url, url, key)
        config["token_store"]["key_prefix"] = "royalti-proxy"
        a = await start_proxy(config)
        await idle(a)
        b = await start_proxy(config)
        await idle(b)
        for p in (a, b):
            assert p.store is not None and not p.store.degraded and not p.store.errors
        assert shared(b).outcomes["shared"] == 1
        assert (fake.login_calls, fake.authtoken_calls[WS[0]]) == (1, 1)
    finally:
        server.stop()


async def test_rediss_verifies_the_server_against_ca_file(
    start_proxy: ProxyFactory,
    fake: FakeRoyalti,
    fake_url: str,
    redis_bin: str,
    tmp_path: Path,
    key: str,
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    server = RedisServer(redis_bin, tmp_path, scheme="rediss")
    server.extra = [
        f"tls-port {server.port}",
        "port 0",
        f"tls-cert-file {tmp_path / 'server.crt'}",
        f"tls-key-file {tmp_path / 'server.key'}",
        f"tls-ca-cert-file {tmp_path / 'ca.crt'}",
        "tls-auth-clients no",
    ]
    server.start()
    try:
        trusted = royalti_shared(fake_url, server.url, key, ca_file=str(tmp_path / "ca.crt"))
        proxy = await start_proxy(trusted)
        await idle(proxy)
        assert proxy.store is not None and not proxy.store.degraded
        assert shared(proxy).outcomes["renewed"] == 1
        # Without the CA the server is not trusted: the proxy works, alone.
        untrusted = await start_proxy(royalti_shared(fake_url, server.url, key))
        await idle(untrusted)
        assert untrusted.store is not None and untrusted.store.degraded
        assert shared(untrusted).outcomes["local"] == 1
    finally:
        server.stop()


# -- five real processes ----------------------------------------------------------------------


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[tuple[Path, list[asyncio.subprocess.Process]]]:
    procs: list[asyncio.subprocess.Process] = []
    try:
        yield tmp_path, procs
    finally:
        await stop_all(procs)


def key_file(tmp: Path) -> str:
    path = tmp / "store.key"
    path.write_text(Fernet.generate_key().decode() + "\n")
    return str(path)


def process_config(upstream: dict[str, Any], redis_url: str, key_path: str) -> dict[str, Any]:
    return {
        "upstreams": [upstream],
        "token_store": {
            "type": "redis",
            "url": redis_url,
            "key_prefix": PREFIX,
            "encryption_key_file": key_path,
            "timeout": "1s",  # five processes on a busy CI machine: no fallback by chance
        },
    }


def royalti_upstream(url: str) -> dict[str, Any]:
    return {
        "name": "royalti",
        "url": url,
        "auth": {
            "type": "royalti",
            "email": "ops@example.com",
            "password": "correct-horse",
            "default_workspace": WS[0],
        },
    }


async def load(
    http: aiohttp.ClientSession, procs: list[Replica], path: str, seconds: float
) -> list[int]:
    """Requests through every replica, for every workspace, ``seconds`` long; their statuses."""
    statuses: list[int] = []
    end = time.monotonic() + seconds

    async def one(r: Replica, ws: str) -> None:
        while time.monotonic() < end:
            async with http.get(r.proxy + path, headers={"X-Royalti-Workspace": ws}) as resp:
                await resp.read()
                statuses.append(resp.status)
            await asyncio.sleep(0.02)

    await asyncio.gather(*(one(r, ws) for r in procs for ws in WS))
    return statuses


async def test_five_processes_cold_start_under_load_log_in_once_and_fetch_each_workspace_once(
    redis_server: RedisServer, replicas: tuple[Path, list[asyncio.subprocess.Process]]
) -> None:
    tmp, procs = replicas
    fake = FakeRoyalti(access_lifetime=600, refresh_lifetime=3600)
    runner, url = await start_fake(fake)
    try:
        config = process_config(royalti_upstream(url), redis_server.url, key_file(tmp))
        five = await start_replicas(tmp, [config] * 5, procs)
        async with aiohttp.ClientSession() as http:
            statuses = await load(http, five, "/user/", 1.0)
            assert statuses and set(statuses) == {200}
            assert fake.login_calls == 1
            assert fake.authtoken_calls == dict.fromkeys(WS, 1)
            renewed = [
                await r.metric(
                    http,
                    "royalti_proxy_token_store_fetches_total",
                    upstream="royalti",
                    outcome="renewed",
                )
                for r in five
            ]
            assert sum(renewed) == len(WS)
    finally:
        await runner.cleanup()


async def test_five_processes_rotate_one_oauth2_refresh_token_chain_without_reuse(
    redis_server: RedisServer, replicas: tuple[Path, list[asyncio.subprocess.Process]]
) -> None:
    tmp, procs = replicas
    oauth = FakeOAuth2(clients={}, users={USER: PASSWORD}, expires_in=3)
    runner, url = await start_fake_oauth2(oauth)
    upstream = {
        "name": "vbot",
        "url": f"{url}/api",
        "auth": {
            "type": "oauth2_password",
            "token_url": f"{url}/token",
            "username": USER,
            "password": PASSWORD,
        },
    }
    try:
        config = process_config(upstream, redis_server.url, key_file(tmp))
        five = await start_replicas(tmp, [config] * 5, procs)
        async with aiohttp.ClientSession() as http:
            started = time.monotonic()
            statuses = await load(http, five, "/x", 7.0)
            elapsed = time.monotonic() - started
            # A renewal that a loaded machine delays past the fake's expiry earns a 401 and a
            # replay, and the replay may renew once more: those are counted, not guessed at.
            replays = sum(
                [await r.metric(http, "royalti_proxy_replays_total", upstream="vbot") for r in five]
            )
        assert set(statuses) == {200}
        assert oauth.calls["password"] == 1
        # One renewal per round (a token of 3 s, renewed at 75-85 % of 2.7 s), fleet-wide, plus
        # at most one per replayed request.
        rounds = oauth.calls["refresh_token"]
        assert elapsed / 2.7 - 1 <= rounds <= elapsed / (0.75 * 2.7) + 1 + replays
        assert oauth.reused_refresh_tokens == 0
        sent = [f["refresh_token"] for f in oauth.forms if f.get("grant_type") == "refresh_token"]
        assert len(sent) == len(set(sent))
    finally:
        await runner.cleanup()


async def test_five_processes_serve_every_request_while_redis_is_stopped_and_restarted(
    redis_server: RedisServer, replicas: tuple[Path, list[asyncio.subprocess.Process]]
) -> None:
    tmp, procs = replicas
    fake = FakeRoyalti(access_lifetime=3, refresh_lifetime=3600)
    runner, url = await start_fake(fake)
    try:
        config = process_config(royalti_upstream(url), redis_server.url, key_file(tmp))
        five = await start_replicas(tmp, [config] * 5, procs)
        async with aiohttp.ClientSession() as http:
            traffic = asyncio.ensure_future(load(http, five, "/user/", 9.0))
            await asyncio.sleep(2.5)
            redis_server.stop()
            await asyncio.sleep(3.5)  # every token is renewed at least once, locally
            redis_server.start()
            statuses = await traffic

            async def all_shared_again() -> bool:
                values = [await r.metric(http, "royalti_proxy_token_store_degraded") for r in five]
                return values == [0.0] * 5

            await poll(all_shared_again, "every replica to use Redis again", 10)
            for r in five:
                assert await r.metric(
                    http, "royalti_proxy_token_store_errors_total", reason="connection"
                )
        assert statuses and set(statuses) == {200}
        assert fake.login_calls == 1  # the refresh token outlived the outage in every replica
        for r in five:
            # The outage is told once, not per request (each replica served hundreds), and
            # every degraded is followed by a recovered. A second short pair is allowed: a
            # Redis that has just restarted on a busy 2-core machine can miss a 1 s deadline.
            changes = [
                e["event"]
                for e in r.events()
                if e.get("event") in ("token_store_degraded", "token_store_recovered")
            ]
            pairs = len(changes) // 2
            assert 1 <= pairs <= 2, changes
            assert changes == ["token_store_degraded", "token_store_recovered"] * pairs
    finally:
        await runner.cleanup()
