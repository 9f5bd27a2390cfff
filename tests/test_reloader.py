"""proxy/reload.py on its own: what a reload keeps from the running configuration, a rejected
one, one reload at a time, and the file watcher on the injected clock (no proxy needed: the
target is a small recording class)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import pytest

from proxy.clock import FakeClock
from proxy.config import Config, build
from proxy.errors import ConfigError
from proxy.reload import Reloader, pinned, stat_all, watched_files
from tests.conftest import royalti_config


def config(listen: str = "127.0.0.1:0", **extra: object) -> Config:
    data = royalti_config("http://127.0.0.1:1", default_workspace="ws")
    data["listen"] = listen
    data.update(extra)
    return build(data, {}, source="test")


class Target:
    """A Reloadable that records what it was asked to apply."""

    def __init__(self, running: Config) -> None:
        self.config = running
        self.applied: list[Config] = []
        self.gate: asyncio.Event | None = None

    async def apply(self, config: Config) -> bool:
        if self.gate is not None:
            await self.gate.wait()
        self.applied.append(config)
        self.config = config
        return True


async def test_listen_addresses_and_the_store_are_kept_and_each_change_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = config()
    new = config(listen="127.0.0.1:9999", token_store={"type": "memory"}, access_log=False)
    with caplog.at_level(logging.WARNING, logger="proxy"):
        kept = pinned(old, new)
    assert (kept.listen, kept.admin.listen, kept.token_store) == (
        old.listen,
        old.admin.listen,
        old.token_store,
    )
    assert kept.access_log is False  # everything else is the new configuration's
    keys = [getattr(r, "key", None) for r in caplog.records]
    assert keys == ["listen"]  # the store did not change: nothing said about it


async def test_an_event_loop_change_is_kept_for_the_next_restart_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = config()
    # Replaced rather than loaded: `event_loop: uvloop` loads only where uvloop is installed.
    new = dataclasses.replace(config(), event_loop="uvloop", access_log=True)
    with caplog.at_level(logging.WARNING, logger="proxy"):
        kept = pinned(old, new)
    assert kept.event_loop == "asyncio"
    assert kept.access_log is True
    assert [(getattr(r, "event", None), getattr(r, "key", None)) for r in caplog.records] == [
        ("reload_ignored", "event_loop")
    ]


async def test_a_configuration_that_does_not_load_is_rejected_and_nothing_applied(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> Config:
        raise ConfigError(["upstreams: missing"])

    target = Target(config())
    reloader = Reloader(target, source=broken, clock=FakeClock())
    with caplog.at_level(logging.ERROR, logger="proxy"):
        assert await reloader.reload() is False
    assert target.applied == []
    assert [getattr(r, "problems", None) for r in caplog.records] == [["upstreams: missing"]]


async def test_without_a_source_only_an_explicit_configuration_reloads() -> None:
    target = Target(config())
    reloader = Reloader(target, source=None, clock=FakeClock())
    assert await reloader.reload() is False
    assert await reloader.reload(config(access_log=False)) is True
    assert len(target.applied) == 1


async def test_reloads_run_one_at_a_time() -> None:
    target = Target(config())
    target.gate = asyncio.Event()
    reloader = Reloader(target, source=lambda: config(access_log=False), clock=FakeClock())
    first = asyncio.ensure_future(reloader.reload())
    second = asyncio.ensure_future(reloader.reload())
    await asyncio.sleep(0)
    assert not first.done() and not second.done()
    target.gate.set()
    assert await asyncio.gather(first, second) == [True, True]
    assert len(target.applied) == 2


async def test_the_watcher_reloads_when_a_watched_file_is_replaced_and_stops_with_its_block(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    secret = tmp_path / "password"
    secret.write_text("one\n")
    data = royalti_config("http://127.0.0.1:1", default_workspace="ws")
    auth = data["upstreams"][0]["auth"]
    del auth["password"]
    auth["password_file"] = str(secret)
    data["reload_poll"] = "5s"
    running = build(data, {}, source="test")
    assert str(secret) in watched_files(running)
    target = Target(running)
    reloader = Reloader(target, source=lambda: build(data, {}, source="test"), clock=clock)
    async with reloader.watch():
        await clock.advance(5)
        assert target.applied == []  # nothing changed
        new = tmp_path / "password.new"
        new.write_text("two\n")
        new.replace(secret)  # a new inode: what Kubernetes' symlink swap shows a stat
        await clock.advance(5)
        assert len(target.applied) == 1
    await clock.advance(50)
    assert len(target.applied) == 1
    assert clock.sleepers == 0


def test_a_missing_file_stats_as_none(tmp_path: Path) -> None:
    present = tmp_path / "present"
    present.write_text("x")
    states = stat_all([str(present), str(tmp_path / "absent")])
    assert states[str(present)] is not None
    assert states[str(tmp_path / "absent")] is None
