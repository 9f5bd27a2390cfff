"""The replacement for a token an upstream rejected (``proxy.tokens.rejected``), the one call
behind the request replay and the WebSocket handshake replay: no network, an in-memory source."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator

import pytest

from proxy.clock import FakeClock, settle
from proxy.config import TokenSettings
from proxy.errors import TokenFetchError
from proxy.tokens.manager import TokenManager
from proxy.tokens.rejected import replacement
from proxy.tokens.token import Token
from tests.tokens.test_manager import ScriptedSource


class SameValueSource(ScriptedSource):
    """An issuer that hands back the same token value on every fetch."""

    async def fetch(self, key: str) -> Token:
        token = await super().fetch(key)
        return dataclasses.replace(token, value="always-the-same")


def make_manager(clock: FakeClock, source: ScriptedSource) -> TokenManager:
    return TokenManager(
        upstream="u",
        source=source,
        clock=clock,
        settings=TokenSettings(idle_timeout=3600, max_entries=100),
        rng=random.Random(1),
    )


@pytest.fixture
def source(clock: FakeClock) -> ScriptedSource:
    return ScriptedSource(clock)


@pytest.fixture
async def manager(clock: FakeClock, source: ScriptedSource) -> AsyncIterator[TokenManager]:
    m = make_manager(clock, source)
    yield m
    await m.close()


async def test_a_rejected_token_that_is_still_cached_is_replaced_by_a_fresh_one(
    manager: TokenManager, source: ScriptedSource
) -> None:
    old = await manager.get("ws")
    fresh = await replacement(manager, "ws", old)
    assert fresh is not None
    assert fresh.value != old.value
    assert manager.peek("ws") == fresh
    assert source.calls == ["ws", "ws"]


async def test_a_token_rejected_after_it_was_renewed_gets_the_renewed_one_without_a_fetch(
    manager: TokenManager, source: ScriptedSource
) -> None:
    old = await manager.get("ws")
    renewed = await replacement(manager, "ws", old)
    # A late rejection of the old token does not drop the renewed one.
    assert await replacement(manager, "ws", old) == renewed
    assert manager.peek("ws") == renewed
    assert len(source.calls) == 2


async def test_a_burst_of_rejections_of_one_token_causes_one_renewal(
    manager: TokenManager, source: ScriptedSource
) -> None:
    old = await manager.get("ws")
    source.gate = asyncio.Event()
    tasks = [asyncio.ensure_future(replacement(manager, "ws", old)) for _ in range(20)]
    await settle()
    source.gate.set()
    fresh = await asyncio.gather(*tasks)
    assert {t.value if t else None for t in fresh} == {"tok-2-ws"}
    assert len(source.calls) == 2


async def test_there_is_no_replacement_when_the_issuer_hands_back_the_rejected_value(
    clock: FakeClock,
) -> None:
    source = SameValueSource(clock)
    manager = make_manager(clock, source)
    try:
        old = await manager.get("ws")
        assert await replacement(manager, "ws", old) is None
        assert len(source.calls) == 2
    finally:
        await manager.close()


async def test_there_is_no_replacement_when_no_token_can_be_had(
    manager: TokenManager, source: ScriptedSource
) -> None:
    old = await manager.get("ws")
    source.failures = [TokenFetchError("HTTP_500", "down")] * 10
    assert await replacement(manager, "ws", old) is None
    # The rejected token was dropped all the same: it is never sent again.
    assert manager.peek("ws") is None
