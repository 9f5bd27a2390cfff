"""Issue 12, part 1, against the hostile token endpoint: an access token issued "seven hours ago
for six hours" by its own clock, in an answer whose ``Date`` says now, is indistinguishable from a
fresh token from an issuer whose clock is seven hours behind. It is used (no 503), one warning
names the skew, and an upstream that really refuses it costs one renewal per refusal (the 401
replay), not a loop."""

from __future__ import annotations

import aiohttp

from proxy.clock import FakeClock
from proxy.tokens.manager import MIN_AGE_TO_DROP_AGAIN
from tests.conftest import WS, ProxyFactory, run_for
from tests.faults.conftest import FaultLog, LeakCheck
from tests.faults.servers import HostileTokenServer
from tests.faults.test_token_endpoint import BETA, admin, fetches, get, hostile_config


async def test_a_token_whose_exp_is_before_the_date_header_is_used_not_refused(
    clock: FakeClock,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    hostile: HostileTokenServer,
    fake_api_url: str,
    fault_log: FaultLog,
    leak_check: LeakCheck,
) -> None:
    proxy = await start_proxy(hostile_config(fake_api_url, hostile, default_workspace=WS[0]))
    await proxy.managers["royalti"].wait_idle()
    hostile.authtoken_fault = "exp_in_the_past_with_iat"
    hostile.fault_workspaces = {BETA}

    status, headers, body, _ = await get(http, proxy, BETA)
    # The fake upstream's clock is the Date clock: it refuses the token, and says so itself.
    assert status == 401, body
    assert "X-Royalti-Proxy-Error" not in headers
    # default, then beta, then one more for beta after the 401 (the same value in the same
    # second, so not sent again): one renewal per refusal, no loop.
    assert fetches(proxy, "access", "success") == 3
    assert fetches(proxy, "access", "TOKEN_EXPIRED") == 0
    assert [r.skew_seconds for r in fault_log.events("issuer_clock_skew")] == [-7 * 3600]
    tokens = await admin(http, proxy, "/tokens")
    leak_check.place("/tokens", str(tokens))
    beta = next(t for t in tokens["upstreams"][0]["tokens"] if t["workspace"] == BETA)
    assert beta["state"] == "valid"
    assert 6 * 3600 - 2 <= beta["expires_in"] <= 6 * 3600
    # Once the endpoint heals, the next fresh token is accepted upstream.
    hostile.heal()
    await run_for(clock, proxy, MIN_AGE_TO_DROP_AGAIN + 1, 5)  # the refused token may go now
    proxy.managers["royalti"].invalidate(BETA, proxy.managers["royalti"].peek(BETA))  # type: ignore[arg-type]
    assert (await get(http, proxy, BETA))[0] == 200
