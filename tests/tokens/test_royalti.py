"""The Royalti credential chain end to end: the real proxy, the fake Royalti API on a real
socket, and an injected clock that both of them read."""

from __future__ import annotations

import asyncio
import logging

import jwt
import pytest

from proxy.fakes.royalti import FakeRoyalti, start_fake
from tests.conftest import WS, royalti_config, run_for


def _claims(authorization: str) -> dict:
    return jwt.decode(authorization.removeprefix("Bearer "), options={"verify_signature": False})


async def _get(http, proxy, path="/user/", workspace=None):
    headers = {"X-Royalti-Workspace": workspace} if workspace else {}
    async with http.get(proxy.addresses["proxy"] + path, headers=headers) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def test_login_mode_forwards_with_a_token_for_the_requested_workspace(
    start_proxy, fake, fake_url, http
):
    proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
    status, body, _ = await _get(http, proxy, workspace="ws-beta")
    assert status == 200
    assert body["workspace"] == "ws-beta"
    assert fake.login_calls == 1
    assert _claims(fake.tokens_seen[-1])["activeWorkspace"] == "ws-beta"


async def test_tokens_differ_per_workspace_and_each_names_its_workspace(
    start_proxy, fake, fake_url, http
):
    proxy = await start_proxy(royalti_config(fake_url))
    for ws in WS:
        status, body, _ = await _get(http, proxy, workspace=ws)
        assert (status, body["workspace"]) == (200, ws)
    tokens = fake.tokens_seen[-len(WS) :]
    assert len(set(tokens)) == len(WS)
    assert [_claims(t)["activeWorkspace"] for t in tokens] == list(WS)


async def test_the_default_workspace_is_fetched_at_start_up_before_any_request(
    start_proxy, fake, fake_url, http
):
    proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
    await proxy.managers["royalti"].wait_idle()
    assert fake.authtoken_calls == {WS[0]: 1}
    status, _, _ = await _get(http, proxy)
    assert status == 200
    assert proxy.managers["royalti"].waits == 0  # the request found the token ready


async def test_200_concurrent_requests_over_4_cold_workspaces_cause_1_login_and_4_authtokens(
    start_proxy, fake, fake_url, http
):
    proxy = await start_proxy(royalti_config(fake_url))
    results = await asyncio.gather(*(_get(http, proxy, workspace=WS[i % 4]) for i in range(200)))
    assert all(status == 200 for status, _, _ in results)
    assert fake.login_calls == 1
    assert fake.authtoken_calls == {ws: 1 for ws in WS}


async def test_refresh_ahead_over_several_lifetimes_never_sends_an_expired_token_nor_waits(
    clock, start_proxy, fake, fake_url, http
):
    proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
    await proxy.managers["royalti"].wait_idle()
    await _get(http, proxy, workspace="ws-beta")  # the one cold fetch
    manager = proxy.managers["royalti"]
    waits = manager.waits
    # 5 access-token lifetimes (600 s each), traffic every 20 s on two workspaces.
    for _ in range(150):
        await run_for(clock, proxy, 20, 5)
        for ws in (WS[0], "ws-beta"):
            status, body, _ = await _get(http, proxy, workspace=ws)
            assert (status, body["workspace"]) == (200, ws)
    assert fake.expired_seen == 0
    assert fake.unauthorized == 0
    assert manager.waits == waits
    # Renewed about once per lifetime per workspace, not in a loop.
    assert 5 <= fake.authtoken_calls[WS[0]] <= 8
    assert 5 <= fake.authtoken_calls["ws-beta"] <= 8


@pytest.mark.parametrize("skew", [3600.0, -3600.0])
async def test_a_clock_skew_of_one_hour_does_not_change_when_tokens_are_renewed(
    clock, start_proxy, http, skew
):
    fake = FakeRoyalti(wall=lambda: clock.wall() + skew, access_lifetime=600, refresh_lifetime=3600)
    runner, url = await start_fake(fake)
    try:
        proxy = await start_proxy(royalti_config(url, default_workspace=WS[0]))
        await proxy.managers["royalti"].wait_idle()
        (state,) = proxy.managers["royalti"].states()
        assert 598 <= state.expires_in <= 600  # exp - iat, not exp - our clock
        for _ in range(60):  # 3 lifetimes
            await run_for(clock, proxy, 30, 10)
            status, _, _ = await _get(http, proxy)
            assert status == 200
        assert fake.expired_seen == 0
        assert 3 <= fake.authtoken_calls[WS[0]] <= 5
    finally:
        await runner.cleanup()


async def test_without_iat_the_lifetime_is_read_against_the_servers_date_header(
    clock, start_proxy, http
):
    fake = FakeRoyalti(wall=lambda: clock.wall() + 7200, access_lifetime=600, omit_iat=True)
    runner, url = await start_fake(fake)
    try:
        proxy = await start_proxy(royalti_config(url, default_workspace=WS[0]))
        await proxy.managers["royalti"].wait_idle()
        (state,) = proxy.managers["royalti"].states()
        assert 590 <= state.expires_in <= 600  # a 2 h skew would make exp - our clock 2.2 h
    finally:
        await runner.cleanup()


async def test_the_refresh_token_is_renewed_by_logging_in_again_before_it_expires(
    clock, start_proxy, fake, fake_url, http
):
    proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
    await proxy.managers["royalti"].wait_idle()
    # 3 refresh-token lifetimes (3600 s each) with traffic every minute.
    for _ in range(180):
        await run_for(clock, proxy, 60, 10)
        status, _, _ = await _get(http, proxy)
        assert status == 200
    assert 3 <= fake.login_calls <= 5
    assert fake.expired_seen == 0
    assert fake.unauthorized == 0


async def test_a_revoked_refresh_token_causes_one_new_login_and_the_request_succeeds(
    clock, start_proxy, fake, fake_url, http
):
    proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
    await proxy.managers["royalti"].wait_idle()
    fake.revoke_refresh_tokens()
    status, body, _ = await _get(http, proxy, workspace="ws-beta")
    assert (status, body["workspace"]) == (200, "ws-beta")
    assert fake.login_calls == 2


async def test_a_refresh_token_that_stays_rejected_after_relogin_does_not_loop(
    clock, start_proxy, fake, fake_url, http
):
    proxy = await start_proxy(royalti_config(fake_url))
    fake.authtoken_failures = [(401, None)] * 50
    status, body, _headers = await _get(http, proxy, workspace="ws-beta")
    assert status == 503
    assert body["error"]["code"] == "TOKEN_UNAVAILABLE"
    assert fake.login_calls == 2  # the first login, then once more: not a loop
    assert sum(fake.authtoken_calls.values()) + (50 - len(fake.authtoken_failures)) >= 2


async def test_login_429_with_retry_after_is_respected(clock, start_proxy, fake, fake_url, http):
    fake.login_failures = [(429, 90.0)]
    proxy = await start_proxy(royalti_config(fake_url))
    status, body, headers = await _get(http, proxy, workspace=WS[0])
    assert status == 503
    assert body["error"]["code"] == "TOKEN_UNAVAILABLE"
    assert int(headers["Retry-After"]) >= 90
    assert headers["X-Royalti-Proxy-Error"] == "TOKEN_UNAVAILABLE"
    # Other workspaces share the login's backoff: no login call before Retry-After has passed.
    for ws in WS:
        await run_for(clock, proxy, 20, 5)
        status, _, _ = await _get(http, proxy, workspace=ws)
        assert status == 503
    assert fake.login_calls == 1
    await run_for(clock, proxy, 20, 5)  # now 100 s later
    status, _, _ = await _get(http, proxy, workspace="ws-beta")
    assert status == 200
    assert fake.login_calls == 2


async def test_token_endpoint_down_keeps_the_token_until_expiry_then_503_then_recovers(
    clock, start_proxy, fake, fake_url, http
):
    proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
    await proxy.managers["royalti"].wait_idle()
    fake.authtoken_failures = [(500, None)] * 10_000
    api_calls = fake.api_calls
    # Until the token's real expiry (600 s), requests keep succeeding with the current token.
    for _ in range(29):
        await run_for(clock, proxy, 20, 5)
        status, _, _ = await _get(http, proxy)
        assert status == 200
    assert len(fake.authtoken_failures) < 10_000  # renewal was attempted, and failed
    await run_for(clock, proxy, 20, 5)
    status, body, headers = await _get(http, proxy)
    assert status == 503
    assert body == {
        "success": False,
        "error": {
            "code": "TOKEN_UNAVAILABLE",
            "message": body["error"]["message"],
            "details": body["error"]["details"],
        },
    }
    assert int(headers["Retry-After"]) >= 1
    assert fake.api_calls == api_calls + 29  # the 503 did not call the upstream
    assert fake.expired_seen == 0
    fake.authtoken_failures = []
    await run_for(clock, proxy, 301, 5)  # the longest backoff
    status, _, _ = await _get(http, proxy)
    assert status == 200


async def test_a_handed_in_refresh_token_is_used_and_its_coming_expiry_is_logged_loudly(
    clock, start_proxy, fake, fake_url, http, caplog
):
    refresh = fake.issue_refresh_token()
    config = royalti_config(fake_url, default_workspace=WS[0])
    auth = config["upstreams"][0]["auth"]
    del auth["email"], auth["password"]
    auth["refresh_token"] = refresh
    proxy = await start_proxy(config)
    status, body, _ = await _get(http, proxy)
    assert (status, body["workspace"]) == (200, WS[0])
    assert fake.login_calls == 0
    with caplog.at_level(logging.WARNING, logger="proxy.tokens"):
        await run_for(clock, proxy, 3000, 10)  # 83 % of the refresh token's life
        status, _, _ = await _get(http, proxy, workspace="ws-beta")
    assert status == 200
    events = [getattr(r, "event", None) for r in caplog.records]
    assert "refresh_token_expiring" in events
    assert all(refresh not in r.getMessage() for r in caplog.records)


async def test_a_refresh_token_from_a_file_is_read_from_the_file(
    tmp_path, start_proxy, fake, fake_url, http
):
    path = tmp_path / "refresh"
    path.write_text(fake.issue_refresh_token() + "\n")
    config = royalti_config(fake_url)
    auth = config["upstreams"][0]["auth"]
    del auth["email"], auth["password"]
    auth["refresh_token_file"] = str(path)
    proxy = await start_proxy(config)
    status, _, _ = await _get(http, proxy, workspace="ws-gamma")
    assert status == 200
    assert fake.login_calls == 0


async def test_api_key_mode_injects_the_key_as_it_is_with_no_exchange(
    start_proxy, fake, fake_url, http
):
    config = royalti_config(fake_url)
    auth = config["upstreams"][0]["auth"]
    del auth["email"], auth["password"]
    auth["api_key"] = "RWAK-demo-key"
    proxy = await start_proxy(config)
    status, _body, _ = await _get(http, proxy)
    assert status == 200
    assert fake.tokens_seen[-1] == "Bearer RWAK-demo-key"
    assert fake.login_calls == 0
    assert sum(fake.authtoken_calls.values()) == 0


async def test_user_id_is_passed_to_authtoken_as_user_id(start_proxy, fake, fake_url, http):
    proxy = await start_proxy(royalti_config(fake_url, user_id="user-42"))
    status, _, _ = await _get(http, proxy, workspace=WS[0])
    assert status == 200
    assert fake.last_user_id == "user-42"


async def test_an_unknown_workspace_fails_without_retrying_fast(start_proxy, fake, fake_url, http):
    proxy = await start_proxy(royalti_config(fake_url))
    for _ in range(5):
        status, body, _ = await _get(http, proxy, workspace="no-such-workspace")
        assert status in (403, 404, 503)
        assert "WORKSPACE" in body["error"]["code"] or "WORKSPACE" in str(body["error"]["details"])
    assert fake.authtoken_calls["no-such-workspace"] == 1
