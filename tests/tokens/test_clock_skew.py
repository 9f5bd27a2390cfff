"""Issue 12, part 1: the issuer's clock (``iat``/``exp``) and the clock that stamps the ``Date``
header disagree. The real proxy against the fake Royalti API with its two clocks set apart:
a freshly issued token is always used, whichever clock is ahead and by however much."""

from __future__ import annotations

import logging

import aiohttp
import jwt
import pytest

from proxy.fakes.royalti import FakeRoyalti, start_fake
from proxy.tokens.source import SINGLE_KEY
from proxy.tokens.token import Token, safety_margin
from tests.conftest import WS, royalti_config, run_for
from tests.tokens.test_oauth2_source import Wall, make_fake, make_source

HOUR = 3600.0
SKEW_EVENT = "issuer_clock_skew"


async def _get(http, proxy, workspace=None):
    headers = {"X-Royalti-Workspace": workspace} if workspace else {}
    async with http.get(proxy.addresses["proxy"] + "/user/", headers=headers) as resp:
        return resp.status, await resp.json()


def _skew_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == SKEW_EVENT]


# (issuer clock offset, Date clock offset, access lifetime): issuer behind and ahead, by an hour
# (longer than a 600 s token lives, shorter than a 6 h one), by seven hours (longer than any
# lifetime here), and the Date clock rather than the issuer's being the one that is off.
LARGE = [
    pytest.param(-HOUR, 0.0, 600, id="issuer-1h-behind-600s"),
    pytest.param(HOUR, 0.0, 600, id="issuer-1h-ahead-600s"),
    pytest.param(-HOUR, 0.0, 6 * HOUR, id="issuer-1h-behind-6h"),
    pytest.param(HOUR, 0.0, 6 * HOUR, id="issuer-1h-ahead-6h"),
    pytest.param(0.0, HOUR, 6 * HOUR, id="date-1h-ahead-6h"),
    pytest.param(-7 * HOUR, 0.0, 6 * HOUR, id="issuer-7h-behind-6h"),
    pytest.param(7 * HOUR, -HOUR, 6 * HOUR, id="issuer-7h-ahead-date-1h-behind-6h"),
]


@pytest.mark.parametrize(("jwt_offset", "date_offset", "lifetime"), LARGE)
async def test_a_skew_beyond_the_tolerance_uses_exp_minus_iat_and_warns_once(
    clock, start_proxy, http, caplog, jwt_offset, date_offset, lifetime
):
    fake = FakeRoyalti(
        wall=clock.wall,
        access_lifetime=lifetime,
        refresh_lifetime=24 * HOUR,
        jwt_offset=jwt_offset,
        date_offset=date_offset,
    )
    runner, url = await start_fake(fake)
    try:
        with caplog.at_level(logging.INFO, logger="proxy.tokens"):
            proxy = await start_proxy(royalti_config(url, default_workspace=WS[0]))
            manager = proxy.managers["royalti"]
            await manager.wait_idle()
            (state,) = manager.states()
            assert state.state == "valid"
            assert lifetime - 2 <= state.expires_in <= lifetime  # exp - iat, minus the margin
            status, body = await _get(http, proxy)
            assert (status, body["workspace"]) == (200, WS[0])
            # Three lifetimes of traffic: every renewal is used, none judged expired on receipt.
            for _ in range(30):
                await run_for(clock, proxy, lifetime / 10, lifetime / 20)
                status, _ = await _get(http, proxy, workspace="ws-beta")
                assert status == 200
                status, _ = await _get(http, proxy)
                assert status == 200
    finally:
        await runner.cleanup()
    assert fake.expired_seen == 0
    assert fake.unauthorized == 0
    assert 3 <= fake.authtoken_calls[WS[0]] <= 6  # about one per lifetime, not a loop
    fetched = [
        r for r in caplog.records if getattr(r, "event", None) in ("token_fetched", "token_renewed")
    ]
    assert len(fetched) == sum(fake.authtoken_calls.values())  # every token fetched was kept
    warnings = _skew_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].skew_seconds == round(jwt_offset - date_offset)
    assert warnings[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if getattr(r, "event", None) == "token_fetch_failed"]


SMALL = [
    pytest.param(-180.0, 0.0, id="issuer-3min-behind"),
    pytest.param(180.0, 0.0, id="issuer-3min-ahead"),
    pytest.param(0.0, 240.0, id="date-4min-ahead"),
    pytest.param(0.0, -240.0, id="date-4min-behind"),
]


@pytest.mark.parametrize(("jwt_offset", "date_offset"), SMALL)
async def test_a_skew_of_a_few_minutes_believes_the_date_header_and_does_not_warn(
    clock, start_proxy, http, caplog, jwt_offset, date_offset
):
    lifetime = 6 * HOUR
    fake = FakeRoyalti(
        wall=clock.wall,
        access_lifetime=lifetime,
        jwt_offset=jwt_offset,
        date_offset=date_offset,
    )
    runner, url = await start_fake(fake)
    try:
        with caplog.at_level(logging.INFO, logger="proxy.tokens"):
            proxy = await start_proxy(royalti_config(url, default_workspace=WS[0]))
            manager = proxy.managers["royalti"]
            await manager.wait_idle()
            (state,) = manager.states()
            # exp - Date when the Date header is behind iat's clock... never more than exp - iat.
            behind = max(0.0, (date_offset - jwt_offset))
            assert lifetime - behind - 2 <= state.expires_in <= lifetime - behind
            for _ in range(20):
                await run_for(clock, proxy, lifetime / 10, lifetime / 20)
                status, _ = await _get(http, proxy)
                assert status == 200
    finally:
        await runner.cleanup()
    assert fake.expired_seen == 0
    assert 2 <= fake.authtoken_calls[WS[0]] <= 4
    assert _skew_warnings(caplog) == []


async def test_a_skew_that_changes_warns_again_once_per_distinct_skew(
    clock, start_proxy, http, caplog
):
    fake = FakeRoyalti(wall=clock.wall, access_lifetime=600, jwt_offset=-HOUR)
    runner, url = await start_fake(fake)
    try:
        with caplog.at_level(logging.WARNING, logger="proxy.tokens"):
            proxy = await start_proxy(royalti_config(url, default_workspace=WS[0]))
            for offset in (-HOUR, -HOUR, 2 * HOUR, 2 * HOUR):
                fake.jwt_offset = offset
                # Past MIN_AGE_TO_DROP_AGAIN, so that each round's invalidation is honoured.
                await run_for(clock, proxy, 31, 31)
                for ws in WS:
                    token = proxy.managers["royalti"].peek(ws)
                    if token is not None:
                        proxy.managers["royalti"].invalidate(ws, token)  # next request: fresh
                    status, _ = await _get(http, proxy, workspace=ws)
                    assert status == 200
    finally:
        await runner.cleanup()
    assert [r.skew_seconds for r in _skew_warnings(caplog)] == [-3600, 7200]


@pytest.mark.parametrize("skew", [-3600, 3600, -7 * 3600])
async def test_an_oauth2_jwt_without_expires_in_from_a_skewed_issuer_is_used_for_exp_minus_iat(
    serve, clock, caplog, skew
):
    # The OAuth2 source falls back on the JWT's exp when expires_in is missing: same rule.
    wall = Wall()
    fake = make_fake(wall)
    iat = int(wall()) + skew
    value = jwt.encode({"iat": iat, "exp": iat + 1200}, "k" * 32, algorithm="HS256")
    fake.fail_next = [(200, {"access_token": value, "token_type": "bearer"})]
    async with aiohttp.ClientSession() as session:
        source = make_source(await serve(fake.app), session, clock)
        with caplog.at_level(logging.WARNING, logger="proxy.tokens"):
            token: Token = await source.fetch(SINGLE_KEY)
    assert token.lifetime == pytest.approx(1200 - safety_margin(1200))
    skews = [r for r in caplog.records if getattr(r, "event", None) == SKEW_EVENT]
    assert [r.skew_seconds for r in skews] == [skew]
