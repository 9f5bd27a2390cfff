"""Issue 12, the hunt: a ``Retry-After`` is honoured, but not to the point of an outage. A token
endpoint that asks for a day (a misconfigured limiter, or an HTTP-date stamped by a clock other
than the one behind its ``Date`` header) is asked again after at most
:data:`~proxy.tokens.sources.http.MAX_RETRY_AFTER`."""

from __future__ import annotations

import email.utils

import pytest

from proxy.tokens.sources.http import MAX_RETRY_AFTER, parse_retry_after
from tests.conftest import WS, royalti_config, run_for


@pytest.mark.parametrize(
    ("value", "server_time", "expected"),
    [
        ("120", None, 120.0),
        ("86400", None, MAX_RETRY_AFTER),
        ("99999999999999999999999", None, MAX_RETRY_AFTER),
        (email.utils.formatdate(1_000_000 + 60, usegmt=True), 1_000_000.0, 60.0),
        (email.utils.formatdate(1_000_000 + 7 * 86400, usegmt=True), 1_000_000.0, MAX_RETRY_AFTER),
        (email.utils.formatdate(1_000_000 - 60, usegmt=True), 1_000_000.0, 0.0),
    ],
)
def test_retry_after_is_honoured_up_to_the_cap(value, server_time, expected):
    assert parse_retry_after(value, server_time) == expected


async def test_a_token_endpoint_asking_for_a_day_is_asked_again_within_the_cap(
    clock, start_proxy, fake, fake_url, http
):
    fake.authtoken_failures = [(429, 86400.0)]
    proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
    manager = proxy.managers["royalti"]
    await manager.wait_idle()
    assert manager.peek(WS[0]) is None
    await run_for(clock, proxy, MAX_RETRY_AFTER + 5, 30)
    assert manager.peek(WS[0]) is not None  # renewed in the background once the cap passed
    assert fake.authtoken_calls[WS[0]] == 2
