"""Issue 12, the hunt: a client-chosen path whose answer is always 401 (an endpoint the user may
not use) must not make the proxy renew its token on every request. The 401 replay drops a token
once; a token that was issued moments ago and is refused again is not dropped again until it has
been in use for a while, so such requests cost one renewal per interval, not one each."""

from __future__ import annotations

import asyncio

from proxy.tokens.manager import MIN_AGE_TO_DROP_AGAIN
from tests.conftest import WS, royalti_config, run_for


async def _status(http, proxy, path):
    async with http.get(proxy.addresses["proxy"] + path) as resp:
        await resp.read()
        return resp.status


async def test_requests_to_an_endpoint_that_always_answers_401_do_not_renew_the_token_each_time(
    clock, start_proxy, fake, fake_url, http
):
    proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
    await proxy.managers["royalti"].wait_idle()
    assert fake.authtoken_calls[WS[0]] == 1
    for _ in range(50):
        assert await _status(http, proxy, "/status/401") == 401
    # The first 401 is believed (one renewal, one replay); the replacement is refused as well,
    # and is not dropped again while it is that young.
    assert fake.authtoken_calls[WS[0]] == 2
    assert await _status(http, proxy, "/user/") == 200  # the token itself is fine
    await run_for(clock, proxy, MIN_AGE_TO_DROP_AGAIN + 1, 5)
    results = await asyncio.gather(*(_status(http, proxy, "/status/401") for _ in range(20)))
    assert set(results) == {401}
    assert fake.authtoken_calls[WS[0]] == 3  # once more per interval, however many ask


async def test_a_token_revoked_upstream_is_still_replaced_at_once(
    clock, start_proxy, fake, fake_url, http
):
    proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
    manager = proxy.managers["royalti"]
    await manager.wait_idle()
    for _ in range(3):
        await run_for(clock, proxy, 60, 30)
        fake.revoke_access_token(manager.peek(WS[0]).value)
        assert await _status(http, proxy, "/user/") == 200  # dropped, renewed, replayed
    assert fake.authtoken_calls[WS[0]] == 4
