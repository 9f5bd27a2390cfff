"""Reload: a new configuration applied to the running proxy, on SIGHUP or when a watched file
changes.

:class:`Reloader` loads the configuration again, rejects one that does not load, keeps what
cannot change without a restart (the listen addresses, the token store, the event loop) and
hands the rest to the proxy's :meth:`~Reloadable.apply`, one reload at a time.
:meth:`Reloader.watch` polls the configuration file and every secret file it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from proxy.clock import Clock
from proxy.config import Config
from proxy.errors import ConfigError

log = logging.getLogger("proxy")

#: Sources of a configuration that are not a file to watch.
_NOT_FILES = ("environment", "defaults", "test", "demo")

FileState = tuple[int, int, int, float] | None


class Reloadable(Protocol):
    """What a reload changes: the running configuration, and the upstreams built from it."""

    @property
    def config(self) -> Config: ...

    async def apply(self, config: Config) -> bool:
        """Make ``config`` the running one; False (the running one kept) when it cannot."""
        ...


def stat_all(paths: list[str]) -> dict[str, FileState]:
    """What a stat of each path sees (device, inode, size, mtime); None where it fails."""
    out: dict[str, FileState] = {}
    for p in paths:
        try:
            st = os.stat(p)
            out[p] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime)
        except OSError:
            out[p] = None
    return out


def watched_files(config: Config) -> list[str]:
    """The configuration file and every secret file it names."""
    files = list(config.watched_files)
    if config.source not in _NOT_FILES:
        files.append(config.source)
    return files


def pinned(old: Config, new: Config) -> Config:
    """``new`` with what needs a restart (listen addresses, ``token_store``, ``event_loop``)
    kept from ``old``, each difference logged: what the configuration says is what runs."""
    for what, before, after in (
        ("listen", old.listen, new.listen),
        ("admin.listen", old.admin.listen, new.admin.listen),
    ):
        if before != after:
            log.warning(
                "listen address changes need a restart; keeping the running one",
                extra={"event": "reload_ignored", "key": what},
            )
    if old.token_store != new.token_store:
        log.warning(
            "token_store changes need a restart; keeping the running store",
            extra={"event": "reload_ignored", "key": "token_store"},
        )
    if old.event_loop != new.event_loop:
        log.warning(
            "event_loop changes need a restart; keeping the running loop",
            extra={"event": "reload_ignored", "key": "event_loop"},
        )
    return dataclasses.replace(
        new,
        token_store=old.token_store,
        event_loop=old.event_loop,
        listen=old.listen,
        admin=dataclasses.replace(new.admin, listen=old.admin.listen),
    )


class Reloader:
    """Reloads ``target`` from ``source`` (None: only an explicit configuration reloads)."""

    def __init__(
        self, target: Reloadable, *, source: Callable[[], Config] | None, clock: Clock
    ) -> None:
        self._target = target
        self._source = source
        self._clock = clock
        self._lock = asyncio.Lock()

    @property
    def can_load(self) -> bool:
        return self._source is not None

    async def reload(self, config: Config | None = None) -> bool:
        """Apply ``config``, or the configuration loaded again; False when it is rejected."""
        async with self._lock:
            if config is None:
                if self._source is None:
                    return False
                try:
                    config = self._source()
                except ConfigError as exc:
                    log.error(
                        "new configuration rejected; keeping the running one",
                        extra={"event": "reload_rejected", "problems": exc.problems},
                    )
                    return False
            return await self._target.apply(pinned(self._target.config, config))

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[None]:
        """Reload whenever a watched file changes, while the body runs (nothing to watch
        without a source to load from)."""
        if self._source is None:
            yield
            return
        task = asyncio.ensure_future(self._watch())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _watch(self) -> None:
        # Kubernetes updates mounted Secrets and ConfigMaps by swapping a symlink, which changes
        # the inode a stat of the path sees.
        seen = stat_all(watched_files(self._target.config))
        while True:
            await self._clock.sleep(self._target.config.reload_poll)
            now = stat_all(watched_files(self._target.config))
            if now != seen:
                changed = sorted(p for p in now.keys() | seen.keys() if now.get(p) != seen.get(p))
                log.info("watched file changed", extra={"event": "file_changed", "files": changed})
                await self.reload()
                seen = stat_all(watched_files(self._target.config))
