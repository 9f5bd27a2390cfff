"""The static source: a value that never expires, or a file re-read when it changes, whose last
good value is served while it cannot be read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.clock import FakeClock
from proxy.config import read_secret_file
from proxy.errors import CredentialRejected
from proxy.secret import Secret
from proxy.tokens.sources.static import StaticSource
from proxy.tokens.token import MAX_LIFETIME


async def test_a_value_is_handed_out_with_the_longest_lifetime(clock: FakeClock) -> None:
    source = StaticSource(kind="api_key", value=Secret("RWAK-value"), clock=clock)
    token = await source.fetch("any-workspace")
    assert token.value == "RWAK-value"
    assert token.lifetime == MAX_LIFETIME
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
