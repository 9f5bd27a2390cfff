"""A real ``redis-server`` for the shared-store tests, real proxy processes around it, and
:class:`StoreKind`, which runs one test against the in-memory store and against Redis.

The server runs from a configuration file in the test's temporary directory, on a free loopback
port, with persistence off (``save ""``, ``appendonly no``); it is killed at the end of the test
whatever happens. It can be stopped and started again on the same port, to model an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from redis.asyncio import Redis

from proxy.clock import FakeClock, SystemClock
from proxy.store.base import SharedStore
from proxy.store.memory import MemoryBackend, MemoryStore
from proxy.store.records import Names
from proxy.store.redis_store import RedisStore
from proxy.store.seal import Sealer
from tests.conftest import free_port, spawn_proxy

T = TypeVar("T")

POLL = 0.05


async def poll(condition: Callable[[], Awaitable[bool]], what: str, deadline: float = 20.0) -> None:
    """Wait until ``condition()`` holds, looking every ``POLL`` seconds, at most ``deadline``."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if await condition():
            return
        await asyncio.sleep(POLL)
    pytest.fail(f"timed out after {deadline}s waiting for {what}")


@dataclass
class RedisServer:
    """One ``redis-server`` process. ``extra`` lines are appended to its configuration file
    (``user ...`` ACL lines, TLS settings)."""

    binary: str
    workdir: Path
    port: int = field(default_factory=free_port)
    extra: list[str] = field(default_factory=list)
    scheme: str = "redis"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        conf = self.workdir / "redis.conf"
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            'save ""',
            "appendonly no",
            f"dir {self.workdir}",
            "loglevel warning",
            *self.extra,
        ]
        conf.write_text("\n".join(lines) + "\n")
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, str(conf)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                output = (self.workdir / "redis.log").read_text()
                pytest.fail(f"redis-server exited with {self.proc.returncode}:\n{output}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.02)
        pytest.fail("redis-server did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@dataclass
class Replica:
    """One ``python -m proxy run`` process."""

    proc: asyncio.subprocess.Process
    proxy: str
    admin: str
    log: Path

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def count(self, event: str) -> int:
        return sum(1 for e in self.events() if e.get("event") == event)

    async def metric(self, http: aiohttp.ClientSession, name: str, **labels: str) -> float:
        """The value of one sample of the replica's ``/metrics`` (0 when absent)."""
        async with http.get(self.admin + "/metrics") as resp:
            text = await resp.text()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as exposed
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == (f"{name}{{{want}}}" if labels else name):
                return float(value)
        return 0.0


async def start_replicas(
    tmp: Path, configs: list[dict[str, Any]], procs: list[asyncio.subprocess.Process]
) -> list[Replica]:
    """Start one proxy process per configuration (listen and admin ports filled in), all at
    once, and wait until each admin listener answers ``/livez``. Started processes are appended
    to ``procs`` as soon as they exist, for the caller to kill."""
    replicas = []
    for i, data in enumerate(configs):
        proxy_port, admin_port = free_port(), free_port()
        data = {
            **data,
            "listen": f"127.0.0.1:{proxy_port}",
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "log_format": "json",
            "shutdown_timeout": "2s",
        }
        config = tmp / f"replica{i}.yaml"
        config.write_text(yaml.safe_dump(data))
        log = tmp / f"replica{i}.log"
        proc = await spawn_proxy(config, log)
        procs.append(proc)
        replicas.append(
            Replica(proc, f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{admin_port}", log)
        )
    async with aiohttp.ClientSession() as http:
        for r in replicas:

            async def live(r: Replica = r) -> bool:
                if r.proc.returncode is not None:
                    pytest.fail(f"replica exited with {r.proc.returncode}:\n{r.log.read_text()}")
                try:
                    async with http.get(r.admin + "/livez") as resp:
                        return resp.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await poll(live, "a replica to listen")
    return replicas


async def stop_all(procs: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM every process still running, then SIGKILL what is left after a few seconds."""
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


@dataclass
class StoreKind:
    """One implementation of the shared store under test: ``memory`` (in this process, leases on
    the injected clock) or ``redis`` (a real server, leases on its clock). The same test runs
    against both; these are the few things that differ between them."""

    kind: str
    clock: FakeClock
    key: str
    redis: RedisServer | None = None
    memory: MemoryBackend | None = None

    def store(self, *, lease: float = 15.0, prefix: str = "t") -> SharedStore:
        """A fresh handle on the shared store, as one replica has."""
        if self.memory is not None:
            return MemoryStore(self.memory, prefix=prefix, lease=lease)
        assert self.redis is not None
        return RedisStore(
            Redis.from_url(self.redis.url),
            sealer=Sealer([self.key.encode()]),
            clock=SystemClock(),
            prefix=prefix,
            lease=lease,
        )

    async def expire_locks(self, raw: Redis | None, pattern: str = "*") -> None:
        """What expiry does to every lease whose holder stalled: they are gone."""
        if self.memory is not None:
            self.memory.locks.clear()
            return
        assert raw is not None
        for lock in [k async for k in raw.scan_iter(f"{pattern}lock:*")]:
            await raw.delete(lock)

    async def plant_lock(self, raw: Redis | None, names: Names, seconds: float) -> None:
        """A lease held by a replica that then crashed: it expires after ``seconds``."""
        if self.memory is not None:
            self.memory.locks[names.lock] = (
                "a-replica-that-crashed",
                self.clock.monotonic() + seconds,
            )
            return
        assert raw is not None
        await raw.set(names.lock, "a-replica-that-crashed", px=int(seconds * 1000))

    async def elapse(self, seconds: float) -> None:
        """Let ``seconds`` pass on the clock leases expire on."""
        if self.memory is not None:
            await self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)  # the Redis server's clock: real time

    async def timed(self, work: Awaitable[T], step: float = 0.05) -> tuple[T, float]:
        """``work``'s result and how long it took on the lease clock: for memory, the clock is
        moved forward in ``step``s until it is done."""
        task = asyncio.ensure_future(work)
        if self.memory is None:
            started = time.monotonic()
            result = await task
            return result, time.monotonic() - started
        started = self.clock.monotonic()
        while not task.done():
            await self.clock.advance(step)
            await asyncio.wait({task}, timeout=0.02)
        return task.result(), self.clock.monotonic() - started
