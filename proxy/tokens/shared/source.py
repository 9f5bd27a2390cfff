"""The token source every replica shares (:class:`SharedSource`) and the wiring that wraps a
source in it (:func:`share`)."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

from cachetools import LRUCache

from proxy.clock import Clock
from proxy.config import OAuth2Auth, RoyaltiAuth, UpstreamConfig
from proxy.errors import TokenFetchError
from proxy.store.base import SharedStore
from proxy.store.records import Lease, StoreUnavailable
from proxy.tokens.shared.credential import SharedCredential, Warmable
from proxy.tokens.shared.lease import Claim, Shared, fenced_off, payload, release, take_lease
from proxy.tokens.source import CredentialStatus, TokenSource
from proxy.tokens.token import Token

#: Outcomes of :meth:`SharedSource.fetch`, counted for metrics.
OUTCOMES = ("shared", "waited", "renewed", "fenced", "unshared", "local")

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

    def __init__(self, inner: TokenSource, *, store: SharedStore, scope: str, clock: Clock) -> None:
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

    async def fetch(self, key: str) -> Token:
        names = self.store.names("token", f"{self.scope}:{_key_part(key)}")
        last = self._handed.get(key)

        def ready(shared: Shared | None) -> bool:
            return shared is not None and shared.fresh() and _digest(shared.value) != last

        try:
            claim = await take_lease(self.store, names, self.clock, ready)
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
            await release(self.store, lease, failure)

    async def _write(self, key: str, lease: Lease, version: int, token: Token) -> Token:
        life = token.remaining(self.clock.monotonic())
        try:
            written = await self.store.write(
                lease,
                version=version,
                payload=payload(token.value, token.lifetime, None),
                life=life,
            )
        except StoreUnavailable:
            self.outcomes["unshared"] += 1
            return self._hand(key, token)
        if written is None:
            # Our lease expired while we renewed: whoever holds it now writes, not us. The token
            # we got is valid, so this replica uses it until its next renewal adopts theirs.
            self.outcomes["fenced"] += 1
            fenced_off(lease, "token")
        else:
            self.outcomes["renewed"] += 1
        return self._hand(key, token)

    async def _local(self, key: str) -> Token:
        self.outcomes["local"] += 1
        return self._hand(key, await self.inner.fetch(key))

    async def _adopted(self, key: str, claim: Claim) -> Token:
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
    source: TokenSource, *, store: SharedStore, upstream: str, account: str, clock: Clock
) -> SharedSource:
    """``source`` with its tokens in ``store``; its refresh credential, if it has one, was
    given the :func:`shared_credential` of the same upstream and account when it was made."""
    return SharedSource(source, store=store, scope=_scope(upstream, account), clock=clock)


def shared_credential(
    *, store: SharedStore, upstream: str, account: str, clock: Clock
) -> SharedCredential:
    """Where the refresh credential of ``upstream`` acting as ``account`` is kept in ``store``."""
    return SharedCredential(store, store.names("credential", _scope(upstream, account)), clock)


def _scope(upstream: str, account: str) -> str:
    return f"{_key_part(upstream)}:{account}"
