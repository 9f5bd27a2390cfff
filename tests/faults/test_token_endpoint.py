"""A token endpoint that misbehaves, through the real proxy.

For every way Royalti's ``/auth/authtoken`` or ``/auth/login`` can misbehave (slow, 500, empty,
HTML, JSON without the token, a non-JWT, an expired JWT, a huge body, 429, a reset), the client
gets a prompt 503 ``TOKEN_UNAVAILABLE`` (never held past the token timeout), the proxy says why
in one log line with an ``error_code`` and counts it in ``royalti_proxy_token_fetches_total``,
keeps serving the workspaces that are fine, and recovers on its own once the endpoint heals.
Time for backoffs is the injected clock's; real time passes only for the 0.5 s token timeout.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import Any

import aiohttp
import pytest

from proxy.app import Proxy
from proxy.clock import FakeClock
from proxy.errors import ERROR_HEADER
from tests.conftest import WS, ProxyFactory, royalti_config, run_for
from tests.faults.conftest import FaultLog, LeakCheck
from tests.faults.servers import FAULTS, HUGE_LIMIT, RETRY_AFTER, HostileTokenServer

TOKEN_TIMEOUT = 0.5
PROMPT = 0.5
"""A failure that is not a timeout is answered within this (real) time."""
SEVEN_DAYS = 7 * 24 * 3600
BETA = "ws-beta"


class WrongErrorCode(AssertionError):
    """The fault was handled well (prompt 503, log line, metric, recovery) but reported under
    another error code. Raised last, so that an xfail for it hides no other failure."""


# Faults whose handling is a known proxy bug, marked strict xfail until fixed (none at present).
KNOWN_BUGS: dict[str, pytest.MarkDecorator] = {}


def fault_params() -> list[Any]:
    return [
        pytest.param(
            fault, code, id=fault, marks=[KNOWN_BUGS[fault]] if fault in KNOWN_BUGS else []
        )
        for fault, code in FAULTS.items()
    ]


def hostile_config(upstream: str, hostile: HostileTokenServer, **auth: Any) -> dict[str, Any]:
    data = royalti_config(upstream, auth_url=hostile.url, **auth)
    data["upstreams"][0]["timeouts"] = {"token": TOKEN_TIMEOUT}
    return data


async def get(
    http: aiohttp.ClientSession, proxy: Proxy, workspace: str
) -> tuple[int, Any, bytes, float]:
    """``GET /user/`` in ``workspace``: status, headers, body and the real time it took."""
    start = time.monotonic()
    async with http.get(
        proxy.addresses["proxy"] + "/user/", headers={"X-Royalti-Workspace": workspace}
    ) as resp:
        body = await resp.read()
        return resp.status, resp.headers, body, time.monotonic() - start


def fetches(proxy: Proxy, kind: str, outcome: str) -> float:
    value = proxy.registry.get_sample_value(
        "royalti_proxy_token_fetches_total",
        {"upstream": "royalti", "kind": kind, "outcome": outcome},
    )
    return value or 0.0


async def admin(http: aiohttp.ClientSession, proxy: Proxy, path: str) -> Any:
    async with http.get(proxy.addresses["admin"] + path) as resp:
        assert resp.status == 200
        return await resp.json()


def assert_prompt_503(status: int, headers: Any, body: bytes, elapsed: float, fault: str) -> None:
    assert status == 503, body
    assert headers[ERROR_HEADER] == "TOKEN_UNAVAILABLE"
    assert int(headers["Retry-After"]) >= 1
    if fault == "slow":
        # Held exactly as long as the token timeout, not a moment longer.
        assert TOKEN_TIMEOUT * 0.9 <= elapsed < TOKEN_TIMEOUT + PROMPT
    else:
        assert elapsed < PROMPT


def heal_after(fault: str) -> float:
    """Fake seconds after which the proxy's next attempt is due."""
    return RETRY_AFTER + 2 if fault == "http_429" else 3


# -- /auth/authtoken ---------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "code"), fault_params())
async def test_authtoken_misbehaving_for_one_workspace_is_a_prompt_503_while_others_are_served(
    fault: str,
    code: str,
    clock: FakeClock,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    hostile: HostileTokenServer,
    fake_api_url: str,
    fault_log: FaultLog,
    leak_check: LeakCheck,
) -> None:
    proxy = await start_proxy(hostile_config(fake_api_url, hostile, default_workspace=WS[0]))
    manager = proxy.managers["royalti"]
    await manager.wait_idle()
    assert manager.peek(WS[0]) is not None
    hostile.authtoken_fault = fault
    hostile.fault_workspaces = {BETA}

    status, headers, body, elapsed = await get(http, proxy, BETA)
    leak_check.place("503 body", body)
    assert_prompt_503(status, headers, body, elapsed, fault)

    # One clear log line, with the reason as a code, and the same code in the metric.
    failed = [r for r in fault_log.events("token_fetch_failed") if r.workspace == BETA]
    assert [r.levelno for r in failed] == [logging.WARNING]
    reported = failed[0].error_code
    assert fetches(proxy, "access", reported) == 1
    if fault == "huge_body":
        assert hostile.huge_bytes_sent < HUGE_LIMIT // 4  # the read stopped at 1 MiB

    # Asking again at once is answered at once, without hammering the endpoint.
    for _ in range(5):
        status, _, _, elapsed = await get(http, proxy, BETA)
        assert (status, elapsed < PROMPT) == (503, True)
    assert hostile.calls[f"authtoken:{BETA}"] == 1

    # The other workspace never noticed.
    assert (await get(http, proxy, WS[0]))[0] == 200
    tokens = await admin(http, proxy, "/tokens")
    leak_check.place("/tokens", str(tokens))
    async with http.get(proxy.addresses["admin"] + "/metrics") as resp:
        leak_check.place("/metrics", await resp.read())
    states = {t["workspace"]: t for t in tokens["upstreams"][0]["tokens"]}
    assert states[WS[0]]["state"] == "valid"
    assert states[BETA]["last_error"] == reported

    # Healed, the proxy recovers by itself once its backoff has passed.
    hostile.heal()
    await run_for(clock, proxy, heal_after(fault), 1)
    assert manager.peek(BETA) is not None
    status, _, body, _ = await get(http, proxy, BETA)
    assert status == 200, body
    if reported != code:
        raise WrongErrorCode(f"reported as {reported}, expected {code}")


async def test_authtoken_429_retry_after_is_honoured_before_anything_is_asked_again(
    clock: FakeClock,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    hostile: HostileTokenServer,
    fake_api_url: str,
    leak_check: LeakCheck,
) -> None:
    proxy = await start_proxy(hostile_config(fake_api_url, hostile, default_workspace=WS[0]))
    await proxy.managers["royalti"].wait_idle()
    hostile.authtoken_fault = "http_429"
    hostile.fault_workspaces = {BETA}

    status, headers, body, _ = await get(http, proxy, BETA)
    leak_check.place("503 body", body)
    assert status == 503
    assert int(headers["Retry-After"]) >= RETRY_AFTER - 1
    await run_for(clock, proxy, RETRY_AFTER - 10, 5)
    status, headers, _, _ = await get(http, proxy, BETA)
    assert status == 503
    assert 1 <= int(headers["Retry-After"]) <= 10
    assert hostile.calls[f"authtoken:{BETA}"] == 1  # nothing asked before Retry-After passed

    hostile.heal()
    await run_for(clock, proxy, 12, 1)
    assert hostile.calls[f"authtoken:{BETA}"] == 2
    assert (await get(http, proxy, BETA))[0] == 200


async def test_an_access_token_whose_exp_is_years_ahead_is_used_but_renewed_within_7_days(
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    hostile: HostileTokenServer,
    fake_api_url: str,
    fault_log: FaultLog,
    leak_check: LeakCheck,
) -> None:
    proxy = await start_proxy(hostile_config(fake_api_url, hostile, default_workspace=WS[0]))
    await proxy.managers["royalti"].wait_idle()
    hostile.authtoken_fault = "exp_years_ahead"
    hostile.fault_workspaces = {BETA}

    assert (await get(http, proxy, BETA))[0] == 200
    assert [r.levelno for r in fault_log.events("token_lifetime_capped")] == [logging.WARNING]
    assert fetches(proxy, "access", "success") == 2
    tokens = await admin(http, proxy, "/tokens")
    leak_check.place("/tokens", str(tokens))
    beta = next(t for t in tokens["upstreams"][0]["tokens"] if t["workspace"] == BETA)
    assert SEVEN_DAYS - 60 <= beta["expires_in"] <= SEVEN_DAYS
    assert beta["next_refresh_in"] <= SEVEN_DAYS - 60


# -- /auth/login -------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "code"), fault_params())
async def test_login_misbehaving_is_a_prompt_503_then_the_proxy_recovers_when_it_heals(
    fault: str,
    code: str,
    clock: FakeClock,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    hostile: HostileTokenServer,
    fake_api_url: str,
    fault_log: FaultLog,
    leak_check: LeakCheck,
) -> None:
    hostile.login_fault = fault
    proxy = await start_proxy(hostile_config(fake_api_url, hostile))  # nothing fetched early

    status, headers, body, elapsed = await get(http, proxy, WS[0])
    leak_check.place("503 body", body)
    assert_prompt_503(status, headers, body, elapsed, fault)

    failed = fault_log.events("login_failed")
    assert [r.levelno for r in failed] == [logging.WARNING]
    reported = failed[0].error_code
    assert [r.error_code for r in fault_log.events("token_fetch_failed")] == [reported]
    assert fetches(proxy, "login", reported) == 1
    assert hostile.calls["login"] == 1

    # No crash: both listeners answer, and the status page says what is wrong.
    async with http.get(proxy.addresses["admin"] + "/livez") as resp:
        assert resp.status == 200
    tokens = await admin(http, proxy, "/tokens")
    leak_check.place("/tokens", str(tokens))
    assert tokens["upstreams"][0]["credential"]["last_error"] == reported

    hostile.heal()
    await run_for(clock, proxy, heal_after(fault), 1)
    status, _, body, _ = await get(http, proxy, WS[0])
    assert status == 200, body
    assert hostile.calls["login"] == 2
    assert fetches(proxy, "login", "success") == 1
    if reported != code:
        raise WrongErrorCode(f"reported as {reported}, expected {code}")


async def test_a_refresh_token_whose_exp_is_years_ahead_is_renewed_within_7_days(
    clock: FakeClock,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    hostile: HostileTokenServer,
    fake_api_url: str,
    fault_log: FaultLog,
    leak_check: LeakCheck,
) -> None:
    hostile.login_fault = "exp_years_ahead"
    proxy = await start_proxy(hostile_config(fake_api_url, hostile))

    assert (await get(http, proxy, WS[0]))[0] == 200
    assert len(fault_log.events("token_lifetime_capped")) == 1
    tokens = await admin(http, proxy, "/tokens")
    leak_check.place("/tokens", str(tokens))
    expires_at = datetime.datetime.fromisoformat(tokens["upstreams"][0]["credential"]["expires_at"])
    assert 0 < expires_at.timestamp() - clock.wall() <= SEVEN_DAYS


@pytest.mark.parametrize("endpoint", ["login", "authtoken"])
async def test_a_healthy_answer_that_arrives_in_two_segments_is_read_whole(
    endpoint: str,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    hostile: HostileTokenServer,
    fake_api_url: str,
    leak_check: LeakCheck,
) -> None:
    if endpoint == "login":
        hostile.login_fault = "split_body"
    else:
        hostile.authtoken_fault = "split_body"
    proxy = await start_proxy(hostile_config(fake_api_url, hostile))

    status, _, body, _ = await get(http, proxy, WS[0])
    leak_check.place("response body", body)
    assert status == 200, body


async def test_a_slow_token_endpoint_holds_neither_other_workspaces_nor_more_than_one_call(
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    hostile: HostileTokenServer,
    fake_api_url: str,
    leak_check: LeakCheck,
) -> None:
    proxy = await start_proxy(hostile_config(fake_api_url, hostile, default_workspace=WS[0]))
    await proxy.managers["royalti"].wait_idle()
    hostile.authtoken_fault = "slow"
    hostile.fault_workspaces = {BETA}

    waiting = [asyncio.ensure_future(get(http, proxy, BETA)) for _ in range(20)]
    # While twenty requests wait on the one slow fetch, the other workspace is served at once.
    status, _, _, elapsed = await get(http, proxy, WS[0])
    assert (status, elapsed < PROMPT / 2) == (200, True)
    assert not any(task.done() for task in waiting)
    results = await asyncio.gather(*waiting)
    for status, headers, body, elapsed in results:
        leak_check.place("503 body", body)
        assert_prompt_503(status, headers, body, elapsed, "slow")
    assert hostile.calls[f"authtoken:{BETA}"] == 1  # single flight, also when it fails
