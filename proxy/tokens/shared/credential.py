"""The refresh credential behind a source's tokens: kept in the source's memory
(:data:`LOCAL`) or in the shared store (:class:`SharedCredential`), renewed under its own lease.
A rotating refresh token is marked spent (fenced) *before* it is sent."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol, runtime_checkable

from proxy.clock import Clock
from proxy.errors import TokenFetchError
from proxy.store.base import SharedStore
from proxy.store.records import Lease, Names, StoreUnavailable
from proxy.tokens.shared.lease import Claim, Shared, fenced_off, payload, release, take_lease

#: How long an OAuth2 refresh token is kept in the store: it carries no expiry of its own.
UNDATED_LIFETIME = 30 * 86400.0


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


# -- the shared credential --------------------------------------------------------------------


class _Held:
    """:class:`CredentialHold` over a held lease."""

    def __init__(self, store: SharedStore, claim: Claim, lease: Lease) -> None:
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
                self._lease, version=self._version, payload=payload(value, life, extra), life=life
            )
        except StoreUnavailable as exc:
            return exc.maybe_applied
        if version is None:
            fenced_off(self._lease, "credential")
            return False
        self._version = version
        return True


class SharedCredential:
    """A source's refresh credential kept in the store, renewed by one replica at a time."""

    def __init__(self, store: SharedStore, names: Names, clock: Clock) -> None:
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
            claim = await take_lease(self._store, self._names, self._clock)
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
            await release(self._store, lease, failure)
