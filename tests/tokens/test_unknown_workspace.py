"""Issue 12, part 2: a workspace a client names that Royalti refuses (404: unknown, or not the
user's) is the client's mistake. It is answered 404 ``UNKNOWN_WORKSPACE`` at once, remembered for
``tokens.max_backoff`` so that a flood costs one upstream call per workspace per interval, never
renewed in the background, shown as ``unknown_workspace`` in ``/tokens`` and logged as a client's
request (bounded), not as a configuration error. A default (pinned) workspace refused the same
way is a configuration error, as before. The first half drives the token manager against an
in-memory source; the second, the real proxy against the fake Royalti API."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import random
import tracemalloc

import pytest

from proxy.clock import FakeClock
from proxy.config import TokenSettings
from proxy.errors import (
    ERROR_HEADER,
    TokenFetchError,
    TokenUnavailable,
    UnknownWorkspace,
    WorkspaceRejected,
)
from proxy.tokens.manager import TokenManager
from proxy.tokens.source import CredentialStatus
from proxy.tokens.token import Token
from proxy.tokens.unknown import MAX_WORKSPACE_LENGTH, UNKNOWN_LOG_BURST
from tests.conftest import WS, royalti_config, run_for

INTERVAL = 300.0  # TokenSettings.max_backoff


class WorkspaceSource:
    """Tokens for the workspaces in ``known``; Royalti's 404 for any other."""

    kind = "workspaces"
    per_workspace = True

    def __init__(self, clock: FakeClock, known: set[str], lifetime: float = 600.0) -> None:
        self.clock = clock
        self.known = known
        self.lifetime = lifetime
        self.calls: list[str] = []
        self.count = 0
        self.record = True
        """False: count calls without keeping their keys (so memory measures the manager)."""
        self.gate: asyncio.Event | None = None

    async def fetch(self, key: str) -> Token:
        self.count += 1
        if self.record:
            self.calls.append(key)
        if self.gate is not None:
            await self.gate.wait()
        if key not in self.known:
            raise WorkspaceRejected("WORKSPACE_NOT_FOUND", "authtoken answered 404 for workspace")
        now = self.clock.monotonic()
        return Token(f"tok-{self.count}-{key}", now, self.lifetime, now + self.lifetime)

    def credential_status(self) -> CredentialStatus | None:
        return None

    async def close(self) -> None:
        return None


@pytest.fixture
def source(clock: FakeClock) -> WorkspaceSource:
    return WorkspaceSource(clock, {"ws-real", "ws-default"})


def make_manager(clock: FakeClock, source: WorkspaceSource, **settings: float) -> TokenManager:
    return TokenManager(
        upstream="u",
        source=source,
        clock=clock,
        settings=TokenSettings(**{"idle_timeout": 3600, "max_entries": 1000, **settings}),  # type: ignore[arg-type]
        rng=random.Random(1),
    )


@pytest.fixture
async def manager(clock: FakeClock, source: WorkspaceSource):
    m = make_manager(clock, source)
    yield m
    await m.close()


async def advance(clock: FakeClock, manager: TokenManager, seconds: float, step: float) -> None:
    end = clock.monotonic() + seconds
    while clock.monotonic() < end:
        await clock.advance(min(step, end - clock.monotonic()))
        await manager.wait_idle()


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


# -- the token manager ---------------------------------------------------------------------------


async def test_a_flood_for_an_unknown_workspace_costs_one_call_per_interval_and_gets_404(
    clock, source, manager
):
    source.gate = asyncio.Event()
    waiting = [asyncio.ensure_future(manager.get("no-such-ws")) for _ in range(100)]
    await asyncio.sleep(0)
    source.gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, UnknownWorkspace) for r in results)
    assert results[0].status == 404 and results[0].code == "UNKNOWN_WORKSPACE"
    assert b"unknown workspace" in results[0].body()
    assert results[0].retry_after is None
    for _ in range(1000):
        with pytest.raises(UnknownWorkspace):
            await manager.get("no-such-ws")
    assert source.calls == ["no-such-ws"]
    await advance(clock, manager, INTERVAL - 1, 10)
    with pytest.raises(UnknownWorkspace):
        await manager.get("no-such-ws")
    assert source.calls == ["no-such-ws"]
    await advance(clock, manager, 2, 1)
    with pytest.raises(UnknownWorkspace):
        await manager.get("no-such-ws")  # the interval is over: asked once more
    assert source.calls == ["no-such-ws"] * 2


async def test_an_unknown_workspace_is_never_renewed_and_drops_out_of_the_status(
    clock, source, manager
):
    with pytest.raises(UnknownWorkspace):
        await manager.get("no-such-ws")
    (state,) = manager.states()
    assert (state.key, state.state, state.valid) == ("no-such-ws", "unknown_workspace", False)
    assert state.last_error == "WORKSPACE_NOT_FOUND"
    assert state.next_refresh_in is None and state.fingerprint is None
    assert not manager._tasks  # no renewal loop waits for it
    await advance(clock, manager, INTERVAL + 1, 30)
    assert manager.states() == []
    await advance(clock, manager, 24 * 3600, 600)
    assert source.calls == ["no-such-ws"]  # nothing in the background, however long


async def test_an_unknown_workspace_is_logged_as_a_clients_request_once_per_interval(
    clock, source, manager, caplog
):
    with caplog.at_level(logging.INFO, logger="proxy.tokens"):
        for _ in range(3):
            for _ in range(50):
                with pytest.raises(UnknownWorkspace):
                    await manager.get("no-such-ws")
            await advance(clock, manager, INTERVAL + 1, 60)
    lines = events(caplog, "unknown_workspace")
    assert len(lines) == 3
    assert all(r.workspace == "no-such-ws" and r.levelno == logging.WARNING for r in lines)
    assert events(caplog, "token_fetch_failed") == []
    assert not [r for r in caplog.records if "check the configuration" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_flood_of_distinct_unknown_workspaces_logs_a_bounded_number_of_lines(
    clock, source, manager, caplog
):
    with caplog.at_level(logging.INFO, logger="proxy.tokens"):
        for i in range(500):
            with pytest.raises(UnknownWorkspace):
                await manager.get(f"bogus-{i}")
        await advance(clock, manager, INTERVAL + 1, 60)
        with pytest.raises(UnknownWorkspace):
            await manager.get("bogus-last")
    lines = events(caplog, "unknown_workspace")
    assert len(lines) == UNKNOWN_LOG_BURST + 1
    assert lines[-1].workspace == "bogus-last"
    assert lines[-1].suppressed == 500 - UNKNOWN_LOG_BURST
    assert events(caplog, "token_evicted") == []


async def test_10000_distinct_unknown_workspaces_stay_bounded_in_entries_and_memory(clock, source):
    manager = make_manager(clock, source, max_entries=1000)
    try:
        real = await manager.get("ws-real")
        source.record = False
        gc.collect()
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            for i in range(10_000):
                with pytest.raises(UnknownWorkspace):
                    await manager.get(f"{i:08d}-bogus-workspace-id-0000-000000000000")
            gc.collect()
            after, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert manager.unknown_workspaces() == 1000
        assert len(manager.states()) == 1001  # the real one, and the 1000 newest unknown
        assert len(manager._entries) == 1  # no unknown workspace holds a token-cache slot
        assert len(manager._tasks) == 1  # the real workspace's renewal loop, nothing else
        assert source.count == 1 + 10_000  # one upstream call per distinct workspace
        # 1000 remembered entries of ~200 bytes each (about 200 KiB measured): what the flood
        # leaves behind is bounded by max_entries, not by the number of workspaces named.
        assert after - before < 512 * 1024, after - before
        print(f"held {after - before} bytes after 10,000 unknown workspaces (peak {peak})")
        assert manager.cached("ws-real") is real  # the flood evicted nothing real
    finally:
        await manager.close()


async def test_a_workspace_id_too_long_to_be_one_is_refused_without_asking(source, manager):
    with pytest.raises(UnknownWorkspace):
        await manager.get("x" * (MAX_WORKSPACE_LENGTH + 1))
    assert source.calls == []
    assert manager.states() == []


async def test_a_refused_default_workspace_is_still_a_configuration_error(
    clock, source, manager, caplog
):
    with caplog.at_level(logging.INFO, logger="proxy.tokens"):
        manager.pin(["ws-typo-in-config"])
        await manager.wait_idle()
        with pytest.raises(TokenUnavailable) as info:
            await manager.get("ws-typo-in-config")
        (state,) = manager.states()
        assert (state.state, state.pinned, state.last_error) == (
            "expired",
            True,
            "WORKSPACE_NOT_FOUND",
        )
        await advance(clock, manager, 3 * INTERVAL, 30)
    assert info.value.status == 503
    assert len(source.calls) >= 3  # still retried in the background, at the maximum backoff
    (first, *_) = events(caplog, "token_fetch_failed")
    assert first.levelno == logging.ERROR
    assert "check the configuration" in first.getMessage()
    assert events(caplog, "unknown_workspace") == []


async def test_pinning_a_workspace_remembered_as_unknown_asks_again(clock, source, manager):
    with pytest.raises(UnknownWorkspace):
        await manager.get("ws-later")
    source.known.add("ws-later")
    manager.pin(["ws-later"])
    await manager.wait_idle()
    assert manager.cached("ws-later") is not None
    assert [s.state for s in manager.states()] == ["valid"]


async def test_a_workspace_refused_while_its_token_is_valid_is_served_until_it_expires(
    clock, source, manager
):
    token = await manager.get("ws-real")
    source.known.discard("ws-real")  # the user was removed from the workspace
    await advance(clock, manager, 500, 10)  # the renewal at ~80 % is refused
    assert await manager.get("ws-real") is token
    await advance(clock, manager, 120, 10)
    with pytest.raises(UnknownWorkspace):
        await manager.get("ws-real")
    calls = len(source.calls)
    await advance(clock, manager, 3600, 60)
    assert len(source.calls) == calls
    assert [s.state for s in manager.states()] == []


async def test_other_failures_for_a_client_workspace_are_still_a_503(clock, source, manager):
    async def failing(key: str) -> Token:
        raise TokenFetchError("HTTP_500", "authtoken answered 500")

    source.fetch = failing  # type: ignore[method-assign]
    with pytest.raises(TokenUnavailable):
        await manager.get("ws-real")
    assert [s.state for s in manager.states()] == ["expired"]


# -- the real proxy against the fake Royalti API ---------------------------------------------------


async def _get(http, proxy, workspace):
    async with http.get(
        proxy.addresses["proxy"] + "/user/", headers={"X-Royalti-Workspace": workspace}
    ) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def _admin(http, proxy, path):
    async with http.get(proxy.addresses["admin"] + path) as resp:
        return resp.status, await resp.read()


async def test_a_mistyped_workspace_gets_404_unknown_workspace_and_costs_one_authtoken_call(
    clock, start_proxy, fake, fake_url, http, caplog
):
    with caplog.at_level(logging.INFO, logger="proxy.tokens"):
        proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
        await proxy.managers["royalti"].wait_idle()
        results = await asyncio.gather(*(_get(http, proxy, "no-such-ws") for _ in range(50)))
        for status, headers, body in results:
            assert status == 404
            assert headers[ERROR_HEADER] == "UNKNOWN_WORKSPACE"
            assert "Retry-After" not in headers
            assert body["success"] is False
            assert body["error"]["code"] == "UNKNOWN_WORKSPACE"
            assert "not this user's" in body["error"]["message"]
        assert fake.authtoken_calls["no-such-ws"] == 1
        status, tokens = await _admin(http, proxy, "/tokens")
        listed = {t["workspace"]: t for t in json.loads(tokens)["upstreams"][0]["tokens"]}
        assert listed["no-such-ws"]["state"] == "unknown_workspace"
        assert listed["no-such-ws"]["last_error"] == "WORKSPACE_NOT_FOUND"
        assert (await _admin(http, proxy, "/readyz"))[0] == 200
        _, metrics = await _admin(http, proxy, "/metrics")
        assert b"no-such-ws" not in metrics
        # Hours later: never asked for in the background, gone from /tokens.
        await run_for(clock, proxy, 6 * 3600, 60)
        assert fake.authtoken_calls["no-such-ws"] == 1
        _, tokens = await _admin(http, proxy, "/tokens")
        assert b"no-such-ws" not in tokens
        # Asked for again after the interval: one more call, one more line.
        assert (await _get(http, proxy, "no-such-ws"))[0] == 404
        assert fake.authtoken_calls["no-such-ws"] == 2
        assert (await _get(http, proxy, WS[1]))[0] == 200
    assert [r.workspace for r in events(caplog, "unknown_workspace")] == ["no-such-ws"] * 2
    assert not [r for r in caplog.records if "check the configuration" in r.getMessage()]


async def test_a_mistyped_default_workspace_is_a_503_and_readiness_says_why(
    start_proxy, fake, fake_url, http, caplog
):
    with caplog.at_level(logging.INFO, logger="proxy.tokens"):
        proxy = await start_proxy(royalti_config(fake_url, default_workspace="no-such-default"))
        await proxy.managers["royalti"].wait_idle()
        status, headers, _body = await _get(http, proxy, "no-such-default")
        assert status == 503
        assert headers[ERROR_HEADER] == "TOKEN_UNAVAILABLE"
        ready, why = await _admin(http, proxy, "/readyz")
    assert ready == 503
    assert b"WORKSPACE_NOT_FOUND" in why
    assert [r.levelno for r in events(caplog, "token_fetch_failed")][:1] == [logging.ERROR]
    assert events(caplog, "unknown_workspace") == []


@pytest.mark.parametrize("status", [400, 422])
async def test_a_workspace_id_royalti_calls_invalid_is_unknown_too(
    start_proxy, fake, fake_url, http, status
):
    proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
    await proxy.managers["royalti"].wait_idle()
    fake.authtoken_failures = [(status, None)]  # a validation error for the next workspace
    for _ in range(10):
        got, headers, _body = await _get(http, proxy, "not a uuid")
        assert (got, headers[ERROR_HEADER]) == (404, "UNKNOWN_WORKSPACE")
    assert fake.authtoken_calls["not a uuid"] == 1
    state = next(s for s in proxy.managers["royalti"].states() if s.key == "not a uuid")
    assert (state.state, state.last_error) == ("unknown_workspace", "WORKSPACE_INVALID")


async def test_a_concurrent_flood_of_distinct_bogus_workspaces_costs_one_call_each(
    start_proxy, fake, fake_url, http
):
    proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
    manager = proxy.managers["royalti"]
    await manager.wait_idle()
    bogus = [f"bogus-{i:04d}" for i in range(200)]
    results = await asyncio.gather(*(_get(http, proxy, ws) for ws in bogus * 3))
    assert {status for status, _, _ in results} == {404}
    assert {ws: fake.authtoken_calls[ws] for ws in bogus} == dict.fromkeys(bogus, 1)
    assert manager.unknown_workspaces() == 200
    assert (await _get(http, proxy, WS[0]))[0] == 200
    assert fake.authtoken_calls[WS[0]] == 1  # the default workspace was not disturbed
    assert (await _admin(http, proxy, "/readyz"))[0] == 200
