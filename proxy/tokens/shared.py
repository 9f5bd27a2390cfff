"""Tokens and refresh credentials shared by every replica through a store (``token_store``).

Without a store, each replica logs in and renews on its own (:data:`LOCAL`). With one, for each
shared item (an access token for one upstream and workspace, or the refresh credential behind
them):

* a replica that needs a token reads the store first, and adopts the token there if it is not
  the one it last handed out and still has more than a quarter of its life left;
* otherwise it takes the item's lease, reads again (another replica may just have renewed it),
  and only then calls the token endpoint; it writes the result *fenced* (only while the lease is
  still its own, and over the version it read under it) and gives the lease up;
* a replica that finds the lease taken waits for the holder's result, polling the store, rather
  than calling the endpoint itself; if the holder failed, the waiters get its error, so that a
  login answered with 429 is not tried again by every replica in turn (oauth2-proxy's lock lets
  waiters through to redeem the same refresh token: its issues #1580 and #3456);
* when the store does not answer within its timeout, the replica renews locally exactly as it
  would without a store, and uses the store again once it answers.

Sources with a long-lived credential (Royalti's refresh token, an OAuth2 rotating refresh token)
keep it through a :class:`CredentialStore` set on their ``credential`` attribute: the renewal of
the credential runs under its own lease, and a rotating refresh token is marked spent in the
store (fenced) *before* it is sent, so that no replica can send it a second time, even one whose
lease expired in the middle of the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cachetools import LRUCache

from proxy.clock import Clock
from proxy.config import OAuth2Auth, RoyaltiAuth, UpstreamConfig
from proxy.errors import CredentialRejected, RateLimited, TokenFetchError
from proxy.store.records import Lease, Names, Record, Snapshot, StoreUnavailable
from proxy.tokens.source import CredentialStatus, FetchObserver, TokenSource
from proxy.tokens.token import Token

if TYPE_CHECKING:
    from proxy.store.redis_store import RedisStore

log = logging.getLogger("proxy.tokens")

#: A stored token is adopted only while more than this fraction of its life is left; otherwise
#: the replica renews it (and renewing it again soon would be a loop).
ADOPT_FRACTION = 0.25
#: How long an OAuth2 refresh token is kept in the store: it carries no expiry of its own.
UNDATED_LIFETIME = 30 * 86400.0
#: How long a failed renewal's error is served to other replicas instead of calling again,
#: when the endpoint sent no Retry-After.
FAILURE_HOLD = 0.5
#: Outcomes of :meth:`SharedSource.fetch`, counted for metrics.
OUTCOMES = ("shared", "waited", "renewed", "fenced", "unshared", "local")


# -- what the store holds ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shared:
    """A token or credential as read from the store, with when (on our clocks) it was read."""

    value: str
    remaining: float
    """Seconds it has left, as the store's clock counted them when read."""
    lifetime: float
    """The life it had when written (what "a quarter of its life" is counted against)."""
    extra: Mapping[str, Any]
    read_at: float
    wall_read_at: float

    @classmethod
    def of(cls, record: Record, read_at: float, wall_read_at: float) -> Shared | None:
        p = record.payload
        if p is None or record.remaining <= 0:
            return None
        value, life, extra = p.get("v"), p.get("l"), p.get("x")
        if not isinstance(value, str) or not value or not isinstance(life, int | float):
            return None
        return cls(
            value=value,
            remaining=record.remaining,
            lifetime=float(life),
            extra=extra if isinstance(extra, dict) else {},
            read_at=read_at,
            wall_read_at=wall_read_at,
        )

    def fresh(self) -> bool:
        return self.remaining > ADOPT_FRACTION * self.lifetime

    def token(self) -> Token:
        """As a :class:`Token`: its life counted from before the read, so never too long."""
        return Token(
            value=self.value,
            obtained_at=self.read_at,
            lifetime=self.remaining,
            wall_expires_at=self.wall_read_at + self.remaining,
        )


def _payload(value: str, lifetime: float, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"v": value, "l": lifetime, "x": dict(extra or {})}


# -- the credential seam the sources use ------------------------------------------------------


class CredentialHold(Protocol):
    """The refresh credential while its renewal lease is held (see :class:`CredentialStore`)."""

    async def load(self) -> Shared | None:
        """The credential in the store as read under the lease; None when there is none."""
        ...

    async def take(self) -> Shared | None:
        """The credential, marked spent in the store before it is returned (for refresh tokens
        that rotate: it is sent once, by whoever took it). None when there is none, or when it
        could not be marked spent: then it must not be sent."""
        ...

    async def save(
        self, value: str, *, lifetime: float | None, extra: Mapping[str, Any] | None = None
    ) -> bool:
        """Store a new credential (fenced). True when the store holds it, *or may*: a rotating
        refresh token for which this is True must not be sent from a local copy later."""
        ...


class CredentialStore(Protocol):
    """Where a source keeps its refresh credential: in its own memory (:data:`LOCAL`), or in the
    shared store. ``async with credential.lock() as held:`` brackets one renewal: with a shared
    store, one replica at a time, the others waiting for its result."""

    def lock(self) -> contextlib.AbstractAsyncContextManager[CredentialHold]: ...

    async def peek(self) -> Shared | None:
        """The credential in the store, read without the lease; None when there is none or
        the store does not answer."""
        ...


@runtime_checkable
class UsesCredential(Protocol):
    """A source whose long-lived credential can be shared."""

    credential: CredentialStore


@runtime_checkable
class Warmable(Protocol):
    """A source that can take a copy of the shared credential without calling anything, so
    that a replica that only ever adopted tokens can still renew alone if the store goes down
    (Royalti's refresh token; never a rotating one, which must have one holder)."""

    async def warm(self) -> None: ...


class _Unshared:
    """Nothing stored, nothing kept: the source holds its credential in memory, as alone."""

    async def load(self) -> Shared | None:
        return None

    async def take(self) -> Shared | None:
        return None

    async def save(
        self, value: str, *, lifetime: float | None, extra: Mapping[str, Any] | None = None
    ) -> bool:
        return False


UNSHARED = _Unshared()


class LocalCredential:
    """The credential lives in the source's memory only (``token_store: {type: memory}``)."""

    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[CredentialHold]:
        yield UNSHARED

    async def peek(self) -> Shared | None:
        return None


LOCAL = LocalCredential()


# -- leases -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Claim:
    """The outcome of :func:`_claim`: a lease (and the item as read under it), or the item
    found ready without one."""

    snapshot: Snapshot
    read_at: float
    wall_read_at: float
    lease: Lease | None = None
    waited: bool = False

    def shared(self) -> Shared | None:
        return Shared.of(self.snapshot.record, self.read_at, self.wall_read_at)


async def _claim(
    store: RedisStore,
    names: Names,
    clock: Clock,
    ready: Callable[[Shared | None], bool] | None = None,
) -> _Claim:
    """Take the lease on ``names``, or find the item ``ready`` without it.

    While another replica holds the lease, look again every ``poll_interval`` (real time: the
    lease runs on the Redis server's clock) for at most two lease times; a live holder extends
    its lease, a dead one's expires. Raises the error the last holder recorded, if any, and
    :class:`StoreUnavailable` when the store stops answering.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2 * store.lease
    waited = False
    while True:
        claim = _Claim(await store.snapshot(names), clock.monotonic(), clock.wall(), waited=waited)
        if ready is not None and ready(claim.shared()):
            return claim
        if claim.snapshot.failure is not None:
            raise _recorded(claim.snapshot.failure)
        if not claim.snapshot.locked:
            lease = await store.acquire(names)
            if lease is not None:
                # Read again under the lease: another replica may have renewed in between.
                read_at, wall_read_at = clock.monotonic(), clock.wall()
                try:
                    snapshot = await store.snapshot(names)
                except StoreUnavailable:
                    await _release(store, lease, None)
                    raise
                return _Claim(snapshot, read_at, wall_read_at, lease=lease, waited=waited)
        if loop.time() >= deadline:
            raise TokenFetchError(
                "STORE_WAIT_TIMEOUT", "another replica is still renewing", retry_after=1.0
            )
        waited = True
        await asyncio.sleep(store.poll_interval)


async def _release(store: RedisStore, lease: Lease, failure: TokenFetchError | None) -> None:
    note: dict[str, Any] | None = None
    hold = 0.0
    if failure is not None:
        kind = (
            "rejected"
            if isinstance(failure, CredentialRejected)
            else "rate_limited"
            if isinstance(failure, RateLimited)
            else "error"
        )
        note = {
            "code": failure.code,
            "message": failure.message,
            "retry_after": failure.retry_after,
            "kind": kind,
        }
        hold = max(FAILURE_HOLD, failure.retry_after or 0.0)
    with contextlib.suppress(StoreUnavailable):
        await store.release(lease, failure=note, failure_ttl=hold)


def _recorded(note: Mapping[str, Any]) -> TokenFetchError:
    """The error another replica's renewal ended with, to be raised here instead of calling."""
    code = str(note.get("code") or "RENEWAL_FAILED")
    message = f"another replica's renewal failed: {note.get('message') or code}"
    retry = note.get("retry_after")
    retry_after = float(retry) if isinstance(retry, int | float) else None
    kind = note.get("kind")
    if kind == "rejected":
        return CredentialRejected(code, message, retry_after=retry_after)
    if kind == "rate_limited":
        return RateLimited(code, message, retry_after=retry_after)
    return TokenFetchError(code, message, retry_after=retry_after)


# -- the shared credential --------------------------------------------------------------------


class _Held:
    """:class:`CredentialHold` over a held lease."""

    def __init__(self, store: RedisStore, claim: _Claim, lease: Lease) -> None:
        self._store = store
        self._claim = claim
        self._lease = lease
        self._version = claim.snapshot.record.version

    async def load(self) -> Shared | None:
        return self._claim.shared()

    async def take(self) -> Shared | None:
        shared = self._claim.shared()
        if shared is None:
            return None
        try:
            version = await self._store.write(
                self._lease, version=self._version, payload=None, life=0.0
            )
        except StoreUnavailable:
            return None  # perhaps marked spent, perhaps not: never send it
        if version is None:
            return None  # the lease is another replica's now: it is theirs to send
        self._version = version
        return shared

    async def save(
        self, value: str, *, lifetime: float | None, extra: Mapping[str, Any] | None = None
    ) -> bool:
        life = lifetime if lifetime is not None else UNDATED_LIFETIME
        if life <= 0:
            return False
        try:
            version = await self._store.write(
                self._lease, version=self._version, payload=_payload(value, life, extra), life=life
            )
        except StoreUnavailable as exc:
            return exc.maybe_applied
        if version is None:
            _fenced_off(self._lease, "credential")
            return False
        self._version = version
        return True


class SharedCredential:
    """A source's refresh credential kept in the store, renewed by one replica at a time."""

    def __init__(self, store: RedisStore, names: Names, clock: Clock) -> None:
        self._store = store
        self._names = names
        self._clock = clock

    async def peek(self) -> Shared | None:
        read_at, wall_read_at = self._clock.monotonic(), self._clock.wall()
        try:
            snapshot = await self._store.snapshot(self._names)
        except StoreUnavailable:
            return None
        return Shared.of(snapshot.record, read_at, wall_read_at)

    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[CredentialHold]:
        try:
            claim = await _claim(self._store, self._names, self._clock)
        except StoreUnavailable:
            claim = None
        if claim is None or claim.lease is None:
            yield UNSHARED  # the store is down: renew locally, as without one
            return
        lease = claim.lease
        failure: TokenFetchError | None = None
        try:
            async with self._store.keep(lease):
                yield _Held(self._store, claim, lease)
        except TokenFetchError as exc:
            failure = exc
            raise
        finally:
            await _release(self._store, lease, failure)


def _fenced_off(lease: Lease, what: str) -> None:
    log.warning(
        "renewal lease expired during the renewal; the store keeps the newer value",
        extra={"event": "token_store_fenced", "key": lease.names.value, "what": what},
    )


# -- the shared token source ------------------------------------------------------------------

_SAFE_KEY = re.compile(r"[A-Za-z0-9._~-]{1,128}")


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _key_part(key: str) -> str:
    """A workspace id as it appears in a Redis key: as is when tame, else hashed."""
    if _SAFE_KEY.fullmatch(key):
        return key
    return "h-" + hashlib.sha256(key.encode()).hexdigest()[:32]


class SharedSource:
    """A :class:`~proxy.tokens.source.TokenSource` whose tokens every replica shares.

    Wraps the source that really calls the token endpoint; the manager above it is unchanged.
    ``scope`` (``<upstream>:<account>``) is the part of every key that says what the tokens are
    for.
    """

    def __init__(self, inner: TokenSource, *, store: RedisStore, scope: str, clock: Clock) -> None:
        self.inner = inner
        self.store = store
        self.scope = scope
        self.clock = clock
        self.kind = inner.kind
        self.per_workspace = inner.per_workspace
        self.outcomes: Counter[str] = Counter(dict.fromkeys(OUTCOMES, 0))
        """Fetches by outcome: ``shared`` (adopted from the store), ``waited`` (adopted after
        waiting for another replica), ``renewed`` (called the endpoint, wrote the result),
        ``fenced`` (called the endpoint, but the lease had expired: not written), ``unshared``
        (called the endpoint, the store did not answer the write), ``local`` (store down)."""
        self._handed: LRUCache[str, str] = LRUCache(maxsize=4096)
        self._warmer = inner if isinstance(inner, Warmable) else None

    @property
    def observer(self) -> FetchObserver:
        return self.inner.observer

    @observer.setter
    def observer(self, value: FetchObserver) -> None:
        self.inner.observer = value

    async def fetch(self, key: str) -> Token:
        names = self.store.names("token", f"{self.scope}:{_key_part(key)}")
        last = self._handed.get(key)

        def ready(shared: Shared | None) -> bool:
            return shared is not None and shared.fresh() and _digest(shared.value) != last

        try:
            claim = await _claim(self.store, names, self.clock, ready)
        except StoreUnavailable:
            return await self._local(key)
        lease = claim.lease
        if lease is None:
            return await self._adopted(key, claim)
        failure: TokenFetchError | None = None
        try:
            if ready(claim.shared()):
                return await self._adopted(key, claim)
            async with self.store.keep(lease):
                try:
                    token = await self.inner.fetch(key)
                except TokenFetchError as exc:
                    failure = exc
                    raise
                return await self._write(key, lease, claim.snapshot.record.version, token)
        finally:
            await _release(self.store, lease, failure)

    async def _write(self, key: str, lease: Lease, version: int, token: Token) -> Token:
        life = token.remaining(self.clock.monotonic())
        try:
            written = await self.store.write(
                lease,
                version=version,
                payload=_payload(token.value, token.lifetime, None),
                life=life,
            )
        except StoreUnavailable:
            self.outcomes["unshared"] += 1
            return self._hand(key, token)
        if written is None:
            # Our lease expired while we renewed: whoever holds it now writes, not us. The token
            # we got is valid, so this replica uses it until its next renewal adopts theirs.
            self.outcomes["fenced"] += 1
            _fenced_off(lease, "token")
        else:
            self.outcomes["renewed"] += 1
        return self._hand(key, token)

    async def _local(self, key: str) -> Token:
        self.outcomes["local"] += 1
        return self._hand(key, await self.inner.fetch(key))

    async def _adopted(self, key: str, claim: _Claim) -> Token:
        shared = claim.shared()
        assert shared is not None
        self.outcomes["waited" if claim.waited else "shared"] += 1
        token = self._hand(key, shared.token())
        if self._warmer is not None:  # once: the source keeps its copy current from then on
            warmer, self._warmer = self._warmer, None
            await warmer.warm()
        return token

    def _hand(self, key: str, token: Token) -> Token:
        self._handed[key] = _digest(token.value)
        return token

    def credential_status(self) -> CredentialStatus | None:
        return self.inner.credential_status()

    async def close(self) -> None:
        await self.inner.close()


# -- wiring -----------------------------------------------------------------------------------


def account_of(up: UpstreamConfig) -> str | None:
    """A short, stable id of the account an upstream's credentials act as, from the settings
    that name it (never a secret); None when nothing is worth sharing (API keys, static tokens,
    handed-in refresh tokens: no call to save)."""
    auth = up.auth
    if isinstance(auth, RoyaltiAuth) and auth.mode == "login":
        parts = ["royalti", auth.auth_url or up.url, auth.email or "", auth.user_id or ""]
    elif isinstance(auth, OAuth2Auth):
        parts = [
            "oauth2",
            auth.grant,
            auth.token_url,
            auth.client_id or "",
            auth.username or "",
            auth.scope or "",
            json.dumps(sorted(auth.extra_params.items())),
        ]
    else:
        return None
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def share(
    source: TokenSource, *, store: RedisStore, upstream: str, account: str, clock: Clock
) -> SharedSource:
    """``source`` with its tokens, and its refresh credential if it has one, in ``store``."""
    scope = f"{_key_part(upstream)}:{account}"
    if isinstance(source, UsesCredential):
        source.credential = SharedCredential(store, store.names("credential", scope), clock)
    return SharedSource(source, store=store, scope=scope, clock=clock)
