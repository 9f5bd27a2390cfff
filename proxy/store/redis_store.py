"""The shared token store on Redis, over redis-py's asyncio client.

Per shared item (an access token for one upstream and workspace, or the refresh credential behind
them) with prefix ``P`` (``token_store.key_prefix``), kind ``K`` (``token`` or ``credential``) and
scope ``S`` (``<upstream>:<account>[:<workspace>]``)::

    P:K:{S}          hash {ver, exp, data}   the value: ``data`` sealed (seal.py); ``exp`` in ms on
                                             the Redis server's clock; TTL = its life + GRACE
    P:lock:K:{S}     string                  the renewal lease: a random owner, PX = lease
    P:failed:K:{S}   string (sealed)         why the last renewal failed, for a second or so

Correctness does not depend on any replica's clock: remaining lifetimes are measured by the Redis
server (``TIME`` inside the scripts) and leases expire on it.

Every call is bounded by ``timeout``. A call that fails or times out marks the store *degraded*
(logged once, ``token_store_degraded``); while degraded, calls fail at once without touching the
network, except one probe per ``probe_interval``; the first call that succeeds marks it recovered
(logged once, ``token_store_recovered``). Callers then carry on locally: see
:mod:`proxy.tokens.shared`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from proxy.clock import Clock, SystemClock
from proxy.config import TokenStoreConfig
from proxy.errors import ConfigError
from proxy.store.records import Lease, Names, Record, Snapshot, StoreUnavailable
from proxy.store.seal import Sealer

log = logging.getLogger("proxy.store")
T = TypeVar("T")

#: A value outlives its token by this much, so that its version survives a renewal that
#: happens right at expiry (the compare-and-set needs it); readers see ``remaining <= 0``.
GRACE_MS = 60_000

# KEYS: value, lock, failed. One round trip for everything a reader or a waiter needs.
_SNAPSHOT = """
local h = redis.call('HMGET', KEYS[1], 'ver', 'exp', 'data')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local left = -1
if h[2] then left = tonumber(h[2]) - now end
local locked = redis.call('EXISTS', KEYS[2])
return {h[1] or '0', left, h[3] or '', locked, redis.call('GET', KEYS[3]) or ''}
"""

# KEYS: value, lock. ARGV: owner, expected version, data, life ms, grace ms.
# Fenced: only the lease's owner writes, and only over the version it read under the lease, so a
# replica whose lease expired can neither overwrite a newer value nor bring back a spent one.
_WRITE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local ver = tonumber(redis.call('HGET', KEYS[1], 'ver') or '0')
if ver ~= tonumber(ARGV[2]) then return -2 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local life = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'ver', ver + 1, 'exp', now + life, 'data', ARGV[3])
redis.call('PEXPIRE', KEYS[1], life + tonumber(ARGV[5]))
return ver + 1
"""

# KEYS: lock. ARGV: owner, lease ms.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lock, failed. ARGV: owner, sealed failure ('' for none), its TTL in ms.
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3]) end
redis.call('DEL', KEYS[1])
return 1
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisStore:
    """Sealed values with server-clock TTLs, renewal leases and fenced writes, on Redis."""

    def __init__(
        self,
        client: Redis,
        *,
        sealer: Sealer,
        clock: Clock,
        prefix: str = "royalti-proxy",
        timeout: float = 0.25,
        lease: float = 15.0,
        probe_interval: float = 1.0,
        poll_interval: float = 0.05,
        where: str = "redis",
    ) -> None:
        self._client = client
        self._sealer = sealer
        self._clock = clock
        self._prefix = prefix
        self.timeout = timeout
        self.lease = lease
        self.probe_interval = probe_interval
        self.poll_interval = poll_interval
        """How often a replica waiting for another's renewal looks again (real time)."""
        self.lease_clock: Clock = SystemClock()
        """Real time, not the injected clock: leases expire on the Redis server's clock."""
        self.where = where
        """``host:port`` of the server, for logs: never the URL, which may hold a password."""
        self.degraded = False
        self._degraded_since = 0.0
        self._probe_at = 0.0
        self._warned_unreadable = False
        #: Failed calls by reason (timeout, connection, error) and unreadable values.
        self.errors: Counter[str] = Counter()
        self._snapshot = client.register_script(_SNAPSHOT)
        self._write = client.register_script(_WRITE)
        self._extend = client.register_script(_EXTEND)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_config(cls, cfg: TokenStoreConfig, *, clock: Clock) -> RedisStore:
        """The store ``token_store`` describes. Nothing connects yet: a Redis that is down at
        start-up makes the proxy start degraded, not fail. The key was checked at load."""
        if not cfg.url or cfg.encryption_key is None:
            # proxy.config.load refuses a redis store without them (and a key that is not one).
            raise ConfigError(["token_store: url and encryption_key are required for redis"])
        sealer = Sealer([key.reveal().encode("ascii") for key in cfg.encryption_key.keys])
        url = urlsplit(cfg.url)
        options: dict[str, Any] = {}
        if cfg.ca_file:
            if url.scheme != "rediss":
                raise ConfigError(["token_store.ca_file: only used with a rediss:// url"])
            options["ssl_ca_certs"] = cfg.ca_file
        client = Redis.from_url(
            cfg.url,
            socket_timeout=cfg.timeout,
            socket_connect_timeout=cfg.timeout,
            # One attempt per call: the caller falls back to local renewal instead of waiting.
            retry=Retry(NoBackoff(), 0),
            **options,
        )
        where = url.path if url.scheme == "unix" else f"{url.hostname}:{url.port or 6379}"
        return cls(
            client,
            sealer=sealer,
            clock=clock,
            prefix=cfg.key_prefix,
            timeout=cfg.timeout,
            lease=cfg.lease,
            where=where,
        )

    # -- names --------------------------------------------------------------------------------

    def names(self, kind: str, scope: str) -> Names:
        return Names.of(self._prefix, kind, scope)

    # -- the calls ----------------------------------------------------------------------------

    async def snapshot(self, names: Names) -> Snapshot:
        raw = await self._run(
            "read",
            lambda: self._snapshot(keys=[names.value, names.lock, names.failed]),
        )
        ver, left, data, locked, failed = raw
        payload = self._open(names.value, data) if data else None
        failure = self._open(names.failed, failed) if failed else None
        record = Record(version=int(ver), remaining=int(left) / 1000.0, payload=payload)
        return Snapshot(record=record, locked=bool(int(locked)), failure=failure)

    async def acquire(self, names: Names) -> Lease | None:
        """The lease on ``names`` (SET NX PX with a random owner), or None when another holds it."""
        owner = secrets.token_hex(16)
        got = await self._run(
            "acquire", lambda: self._client.set(names.lock, owner, nx=True, px=_ms(self.lease))
        )
        return Lease(names=names, owner=owner) if got else None

    async def write(
        self, lease: Lease, *, version: int, payload: dict[str, Any] | None, life: float
    ) -> int | None:
        """Write ``payload`` (None: mark the value spent) if ``lease`` is still ours and the
        value is still at ``version``; the new version, or None when fenced off."""
        names = lease.names
        data = self._sealer.seal(names.value, payload) if payload is not None else b""
        result = await self._run(
            "write",
            lambda: self._write(
                keys=[names.value, names.lock],
                args=[lease.owner, version, data, _ms(life) if payload else 0, GRACE_MS],
            ),
            writes=True,
        )
        new = int(result)
        if new < 0:
            lease.lost = lease.lost or new == -1
            return None
        return new

    async def extend(self, lease: Lease) -> bool:
        """Extend ``lease`` by the lease time if it is still ours (compare-and-expire)."""
        ok = await self._run(
            "extend",
            lambda: self._extend(keys=[lease.names.lock], args=[lease.owner, _ms(self.lease)]),
        )
        return bool(int(ok))

    async def release(
        self, lease: Lease, *, failure: dict[str, Any] | None = None, failure_ttl: float = 0.0
    ) -> None:
        """Give ``lease`` up if it is still ours (compare-and-delete), leaving ``failure`` for the
        replicas that were waiting, so that they do not each try the same failing call."""
        names = lease.names
        sealed = self._sealer.seal(names.failed, failure) if failure is not None else b""
        await self._run(
            "release",
            lambda: self._release(
                keys=[names.lock, names.failed], args=[lease.owner, sealed, _ms(failure_ttl)]
            ),
        )

    @contextlib.asynccontextmanager
    async def keep(self, lease: Lease) -> AsyncIterator[Lease]:
        """Extend ``lease`` in the background while the body runs."""
        task = asyncio.ensure_future(self._keep_alive(lease))
        try:
            yield lease
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _keep_alive(self, lease: Lease) -> None:
        # Real time, not the injected clock: the lease expires on the Redis server's clock.
        loop = asyncio.get_running_loop()
        confirmed = loop.time()
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                ok = await self.extend(lease)
            except StoreUnavailable:
                if loop.time() - confirmed >= self.lease:
                    lease.lost = True
                    return
                continue
            if not ok:
                lease.lost = True
                return
            confirmed = loop.time()

    def status_note(self) -> str | None:
        """A line for ``/readyz`` while degraded (which does not make the proxy unready)."""
        if not self.degraded:
            return None
        return f"token store {self.where} unreachable: tokens are renewed locally"

    async def ping(self) -> bool:
        """Connect and load the scripts (so that the first renewals cost one round trip each);
        False, logged once, when the store does not answer."""

        async def warm_up() -> None:
            await self._client.ping()
            for script in (self._snapshot, self._write, self._extend, self._release):
                await self._client.script_load(script.script)

        try:
            await self._run("ping", warm_up)
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self._client.aclose()

    # -- health -------------------------------------------------------------------------------

    async def _run(self, op: str, call: Callable[[], Awaitable[T]], *, writes: bool = False) -> T:
        if self.degraded and self._clock.monotonic() < self._probe_at:
            raise StoreUnavailable("token store degraded")
        try:
            async with asyncio.timeout(self.timeout):
                result = await call()
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            reason = self._failed(op, exc)
            if reason == "connection":
                # The server went away (a restart, a failover): every idle pooled connection is
                # dead too. Drop them now, or each would fail once after the server is back.
                with contextlib.suppress(RedisError, OSError):
                    await self._client.connection_pool.disconnect(inuse_connections=False)
            raise StoreUnavailable(f"token store {op} failed", maybe_applied=writes) from exc
        if self.degraded:
            self._recovered()
        return result

    def _failed(self, op: str, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__:
            reason = "timeout"
        elif isinstance(exc, RedisConnectionError | OSError):
            reason = "connection"
        else:
            reason = "error"
        self.errors[reason] += 1
        now = self._clock.monotonic()
        self._probe_at = now + self.probe_interval
        if self.degraded:
            return reason
        self.degraded = True
        self._degraded_since = now
        # Redis's own error replies (NOPERM, WRONGPASS, ...) name the fix and carry no secret.
        detail = str(exc)[:200] if isinstance(exc, ResponseError) else type(exc).__name__
        log.warning(
            "token store unreachable: serving from the local cache and renewing locally",
            extra={
                "event": "token_store_degraded",
                "store": self.where,
                "operation": op,
                "reason": reason,
                "detail": detail,
            },
        )
        return reason

    def _recovered(self) -> None:
        self.degraded = False
        log.info(
            "token store reachable again: sharing tokens again",
            extra={
                "event": "token_store_recovered",
                "store": self.where,
                "degraded_for": round(self._clock.monotonic() - self._degraded_since, 3),
            },
        )

    def _open(self, name: str, blob: bytes) -> dict[str, Any] | None:
        payload = self._sealer.open(name, blob)
        if payload is None:
            self.errors["unreadable"] += 1
            if not self._warned_unreadable:
                self._warned_unreadable = True
                log.warning(
                    "a stored value does not decrypt with our keys (or was moved between keys); "
                    "ignored and replaced on the next renewal",
                    extra={"event": "token_store_unreadable", "store": self.where},
                )
        return payload
