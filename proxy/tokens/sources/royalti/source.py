"""Royalti's per-workspace access tokens, asked for with the upstream's refresh token (which
:mod:`proxy.tokens.sources.royalti.refresh` holds)."""

from __future__ import annotations

import random
import ssl
from collections.abc import Callable

import aiohttp

from proxy.clock import Clock
from proxy.errors import CredentialRejected, TokenFetchError, WorkspaceRejected
from proxy.secret import Secret
from proxy.tokens.shared import LOCAL, CredentialStore
from proxy.tokens.source import CredentialStatus, FetchObserver, ignore, observed
from proxy.tokens.sources.http import JsonResponse, call_token_endpoint, status_error
from proxy.tokens.sources.royalti.answers import dig, jwt_token
from proxy.tokens.sources.royalti.refresh import RefreshTokens
from proxy.tokens.token import SkewNotice, Token


class RoyaltiSource:
    """Per-workspace access tokens from Royalti, by login or from a handed-in refresh token."""

    per_workspace = True
    kind = "royalti"

    def __init__(
        self,
        *,
        base_url: str,
        email: str | None,
        password: Secret | None,
        refresh_token: Callable[[], Secret | None] | None,
        user_id: str | None,
        session: aiohttp.ClientSession,
        clock: Clock,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        min_backoff: float = 1.0,
        max_backoff: float = 300.0,
        upstream: str = "royalti",
        rng: random.Random | None = None,
        observer: FetchObserver = ignore,
        credential: CredentialStore = LOCAL,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._user_id = user_id
        self._session = session
        self._clock = clock
        self._timeout = timeout
        self._ssl = ssl_context
        self._skew = SkewNotice(upstream)
        self.observer = observer
        self._refresh = RefreshTokens(
            base_url=self._base,
            email=email,
            password=password,
            refresh_token=refresh_token,
            session=session,
            clock=clock,
            timeout=timeout,
            ssl_context=ssl_context,
            min_backoff=min_backoff,
            max_backoff=max_backoff,
            upstream=upstream,
            rng=rng or random.Random(),
            skew=self._skew,
            observer=observer,
            credential=credential,
        )

    @property
    def can_login(self) -> bool:
        return self._refresh.can_login

    @property
    def credential(self) -> CredentialStore:
        """Where the refresh token from logins is kept."""
        return self._refresh.credential

    @property
    def workspaces(self) -> dict[str, str]:
        """Workspace id -> name, from the last login."""
        return self._refresh.workspaces

    # -- access tokens ------------------------------------------------------------------------

    async def fetch(self, key: str) -> Token:
        refresh = await self._refresh.current()
        try:
            return await observed(self.observer, "access", self._access(refresh, key))
        except CredentialRejected as exc:
            if exc.code != "REFRESH_TOKEN_REJECTED" or not self._refresh.can_login:
                raise
        # The refresh token was revoked (or expired early): one new login, then one retry.
        self._refresh.drop(refresh)
        refresh = await self._refresh.current()
        return await observed(self.observer, "access", self._access(refresh, key))

    async def _access(self, refresh: Token, workspace: str) -> Token:
        resp, requested_at, wall_at = await self._authtoken(refresh, workspace)
        return self._access_token(resp, workspace, requested_at, wall_at)

    async def _authtoken(self, refresh: Token, workspace: str) -> tuple[JsonResponse, float, float]:
        params = {"currentWorkspace": workspace}
        if self._user_id:
            params["userId"] = self._user_id
        requested_at, wall_at = self._clock.monotonic(), self._clock.wall()
        resp = await call_token_endpoint(
            self._session,
            "GET",
            f"{self._base}/auth/authtoken",
            headers={"Authorization": f"Bearer {refresh.value}", "Accept": "application/json"},
            params=params,
            timeout=self._timeout,
            ssl_context=self._ssl,
        )
        return resp, requested_at, wall_at

    def _access_token(
        self, resp: JsonResponse, workspace: str, requested_at: float, wall_at: float
    ) -> Token:
        if resp.status == 401:
            raise CredentialRejected("REFRESH_TOKEN_REJECTED", "authtoken answered 401")
        if resp.status == 404:
            # UPSTREAMS.md: 404 is "unknown workspace", also the answer for one that is not
            # the user's. Which workspace is the manager's business (it may be a client's typo).
            raise WorkspaceRejected("WORKSPACE_NOT_FOUND", "authtoken answered 404 for workspace")
        if resp.status in (400, 422):
            # The only thing a request to authtoken varies is currentWorkspace: a validation
            # error is about it (a malformed id, say), just as final as a 404.
            raise WorkspaceRejected(
                "WORKSPACE_INVALID", f"authtoken answered {resp.status} for workspace"
            )
        if resp.status != 200:
            raise status_error(resp, "authtoken")
        value = dig(resp.body, "data", "access_token")
        if not isinstance(value, str) or not value:
            raise TokenFetchError("BAD_RESPONSE", "authtoken response has no data.access_token")
        return jwt_token(
            value,
            reference_time=resp.server_time,
            requested_at=requested_at,
            wall_requested_at=wall_at,
            what="royalti access token",
            skew=self._skew,
        )

    async def warm(self) -> None:
        """Take the refresh token another replica logged in for (see
        :meth:`RefreshTokens.warm`)."""
        await self._refresh.warm()

    # -- status and shutdown ------------------------------------------------------------------

    def credential_status(self) -> CredentialStatus | None:
        return self._refresh.status()

    async def close(self) -> None:
        await self._refresh.close()
