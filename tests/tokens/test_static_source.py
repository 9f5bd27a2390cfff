"""The static source: a value that never expires, or a file re-read when it changes, whose last
good value is served while it cannot be read."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from proxy.clock import FakeClock
from proxy.config import read_secret_file
from proxy.errors import CredentialRejected
from proxy.metrics import ProxyCollector
from proxy.secret import Secret
from proxy.tokens.manager import TokenManager
from proxy.tokens.sources.static import StaticSource


async def test_a_value_is_handed_out_as_a_token_that_does_not_expire(clock: FakeClock) -> None:
    source = StaticSource(kind="api_key", value=Secret("RWAK-value"), clock=clock)
    token = await source.fetch("any-workspace")
    assert token.value == "RWAK-value"
    # Was ``lifetime == MAX_LIFETIME`` (an invented 7-day expiry): now explicitly non-expiring.
    assert token.lifetime == math.inf and not token.expires
    assert token.is_valid(clock.monotonic() + 10 * 365 * 86400)
    assert token.obtained_at == clock.monotonic()
    assert source.credential_status() is None
    assert not source.per_workspace


def test_exactly_one_of_value_and_path_is_required(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        StaticSource(kind="static", clock=clock)
    with pytest.raises(ValueError, match="exactly one"):
        StaticSource(kind="static", value=Secret("x"), path="/x", clock=clock)


async def test_a_file_lives_one_poll_interval_and_a_changed_file_is_read_again(
    clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    source = StaticSource(
        kind="static", path=str(path), read_file=read_secret_file, clock=clock, poll_interval=5
    )
    token = await source.fetch("-")
    assert (token.value, token.lifetime) == ("first", 5)
    replacement = tmp_path / "token.new"
    replacement.write_text("second\n")
    os.replace(replacement, path)  # a new inode, as Kubernetes' symlink swap gives
    assert (await source.fetch("-")).value == "second"


async def test_an_unreadable_file_keeps_the_last_value_and_without_one_is_rejected(
    clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    path.write_text("kept\n")
    source = StaticSource(kind="static", path=str(path), read_file=read_secret_file, clock=clock)
    assert (await source.fetch("-")).value == "kept"
    path.unlink()
    assert (await source.fetch("-")).value == "kept"

    missing = StaticSource(
        kind="static", path=str(tmp_path / "absent"), read_file=read_secret_file, clock=clock
    )
    with pytest.raises(CredentialRejected) as info:
        await missing.fetch("-")
    assert info.value.code == "CREDENTIAL_FILE"


async def test_an_empty_file_is_rejected(clock: FakeClock, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("")
    source = StaticSource(kind="static", path=str(path), read_file=read_secret_file, clock=clock)
    with pytest.raises(CredentialRejected, match="empty"):
        await source.fetch("-")


async def test_a_static_credential_shows_no_expiry_and_is_never_renewed(clock: FakeClock) -> None:
    source = StaticSource(kind="static", value=Secret("static-value"), clock=clock)
    manager = TokenManager(upstream="u", source=source, clock=clock)
    collector = ProxyCollector(
        forwarder=lambda: None, routes=list, managers=lambda: {"u": manager}, ready=lambda: True
    )
    try:
        await manager.get("")
        await manager.wait_idle()
        [state] = manager.states()
        assert state.state == "static" and state.valid
        assert state.expires_in is None and state.wall_expires_at is None
        assert state.next_refresh_in is None
        assert manager._entries[""].next_refresh is None  # no refresh-ahead scheduled
        families = {m.name: m for m in collector.collect()}
        assert families["royalti_proxy_token_expiry_timestamp_seconds"].samples == []
        [valid] = families["royalti_proxy_token_valid"].samples
        assert valid.value == 1.0
    finally:
        await manager.close()


async def test_a_static_file_shows_no_expiry_but_is_still_read_again(
    clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    source = StaticSource(
        kind="static", path=str(path), read_file=read_secret_file, clock=clock, poll_interval=10
    )
    manager = TokenManager(upstream="u", source=source, clock=clock)
    try:
        assert (await manager.get("")).value == "first"
        [state] = manager.states()
        assert state.state == "static"
        assert state.expires_in is None and state.next_refresh_in is None
        path.write_text("second-value\n")
        await clock.advance(30, step=1)
        await manager.wait_idle()
        assert (await manager.get("")).value == "second-value"
    finally:
        await manager.close()
