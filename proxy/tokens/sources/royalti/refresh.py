"""The refresh token of one Royalti upstream (see :mod:`proxy.tokens.sources.royalti`): obtained
by at most one login at a time, renewed by logging in again ahead of its expiry, shared with the
other replicas through ``credential``; or handed in by an operator, when it cannot be renewed and
we warn as it nears expiry."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable

import aiohttp

from proxy.clock import Clock
from proxy.errors import CredentialRejected, RateLimited, TokenFetchError
from proxy.secret import Secret
from proxy.tokens.backoff import retry_delay
from proxy.tokens.shared import CredentialStore, Shared
from proxy.tokens.singleflight import SingleFlight
from proxy.tokens.source import CredentialStatus, FetchObserver, observed
from proxy.tokens.sources.http import call_token_endpoint, status_error
from proxy.tokens.sources.royalti.answers import dig, jwt_token
from proxy.tokens.token import SkewNotice, Token

log = logging.getLogger("proxy.tokens")

#: Warn that a handed-in refresh token is running out once this fraction of its life is gone.
WARN_FRACTION = 0.8
#: The one key of the login single-flight: one refresh token per upstream.
_LOGIN = "login"


class RefreshTokens:
    """Holds, obtains and renews one upstream's refresh token."""

    def __init__(
        self,
        *,
        base_url: str,
        email: str | None,
        password: Secret | None,
        refresh_token: Callable[[], Secret | None] | None,
        session: aiohttp.ClientSession,
        clock: Clock,
        timeout: float,
        ssl_context: ssl.SSLContext | None,
        min_backoff: float,
        max_backoff: float,
        upstream: str,
        rng: random.Random,
        skew: SkewNotice,
        observer: FetchObserver,
        credential: CredentialStore,
    ) -> None:
        self._base = base_url
        self._email = email
        self._password = password
        self._handed_in = refresh_token
        self._session = session
        self._clock = clock
        self._timeout = timeout
        self._ssl = ssl_context
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._upstream = upstream
        self._rng = rng
        self._skew = skew
        self.observer = observer
        self.credential = credential
        """Where the refresh token from logins is kept."""
        self._refresh: Token | None = None
        # The last refresh token held, kept after it is dropped: a replica must not adopt from
        # the shared store the very token it is replacing.
        self._last_refresh: str | None = None
        self._refresh_renew_at: float | None = None
        self._logins: SingleFlight[str, Token] = SingleFlight()
        self._renew_task: asyncio.Task[None] | None = None
        self._login_failures = 0
        self._login_not_before = 0.0
        self._last_error: str | None = None
        self.workspaces: dict[str, str] = {}
        """Workspace id -> name, from the last login."""

    @property
    def can_login(self) -> bool:
        return self._email is not None and self._password is not None

    async def current(self) -> Token:
        """The refresh token to ask for access tokens with: the one held while it is valid, else
        the handed-in one, else one from a login (shared by everybody waiting for it)."""
        now = self._clock.monotonic()
        token = self._refresh
        if token is not None and token.is_valid(now):
            if not self.can_login:
                self._warn_if_expiring(token, now)
            return token
        if self._handed_in is not None and not self.can_login:
            return self._load_handed_in()
        return await self._login()

    def drop(self, token: Token) -> None:
        """Forget ``token`` (authtoken rejected it), unless it was replaced already."""
        if self._refresh is not None and self._refresh.value == token.value:
            log.warning(
                "refresh token rejected; logging in again",
                extra={
                    "event": "refresh_token_rejected",
                    "upstream": self._upstream,
                    "fingerprint": token.fingerprint,
                },
            )
            self._refresh = None

    def _load_handed_in(self) -> Token:
        assert self._handed_in is not None
        try:
            secret = self._handed_in()
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialRejected(
                "CREDENTIAL_FILE", "cannot read the refresh token file"
            ) from exc
        if secret is None or not secret:
            raise CredentialRejected("NO_REFRESH_TOKEN", "no refresh token configured")
        value = secret.reveal()
        if self._refresh is not None and self._refresh.value == value:
            raise CredentialRejected(
                "REFRESH_TOKEN_EXPIRED", "the handed-in refresh token has expired"
            )
        try:
            # Handed in some time after it was issued: what is left is exp minus now, on our
            # clock (the only reference we have), never more than its whole lifetime.
            now = self._clock.wall()
            token = jwt_token(
                value,
                reference_time=now,
                requested_at=self._clock.monotonic(),
                wall_requested_at=now,
                what="handed-in refresh token",
                fresh=False,
            )
        except TokenFetchError as exc:
            raise CredentialRejected(exc.code, f"handed-in refresh token: {exc.message}") from exc
        self._refresh = token
        log.info(
            "refresh token loaded",
            extra={
                "event": "refresh_token_loaded",
                "upstream": self._upstream,
                "fingerprint": token.fingerprint,
                "expires_at": round(token.wall_expires_at, 3),
            },
        )
        return token

    def _warn_if_expiring(self, token: Token, now: float) -> None:
        if now < token.obtained_at + token.lifetime * WARN_FRACTION and token.remaining(now) > 3600:
            return
        log.warning(
            "handed-in refresh token expires soon and cannot be renewed: hand in a new one",
            extra={
                "event": "refresh_token_expiring",
                "upstream": self._upstream,
                "fingerprint": token.fingerprint,
                "expires_in": round(token.remaining(now), 1),
            },
        )

    async def _login(self) -> Token:
        """One login at a time per upstream; everybody waiting shares its outcome."""
        if self._logins.running(_LOGIN) is None:
            now = self._clock.monotonic()
            if now < self._login_not_before:
                raise RateLimited(
                    self._last_error or "LOGIN_BACKOFF",
                    "login is backing off after a failure",
                    retry_after=self._login_not_before - now,
                )
        return await self._logins.join(_LOGIN, self._do_login)

    async def _do_login(self) -> Token:
        assert self._email is not None and self._password is not None
        try:
            async with self.credential.lock() as held:
                token = self._adopt(await held.load())
                adopted = token is not None
                if token is None:
                    token = await observed(
                        self.observer, "login", self._login_once(self._email, self._password)
                    )
                    await held.save(
                        token.value,
                        lifetime=token.remaining(self._clock.monotonic()),
                        extra={"workspaces": self.workspaces},
                    )
        except TokenFetchError as exc:
            self._login_failures += 1
            self._last_error = exc.code
            delay = retry_delay(
                exc,
                self._login_failures,
                min_backoff=self._min_backoff,
                max_backoff=self._max_backoff,
                rng=self._rng,
            )
            self._login_not_before = self._clock.monotonic() + delay
            log.warning(
                "login failed",
                extra={
                    "event": "login_failed",
                    "upstream": self._upstream,
                    "error_code": exc.code,
                    "consecutive_failures": self._login_failures,
                    "retry_in": round(delay, 1),
                },
            )
            raise
        self._login_failures = 0
        self._last_error = None
        self._hold(token, adopted=adopted)
        return token

    async def warm(self) -> None:
        """Take the refresh token another replica logged in for, when the shared store has a
        fresh one, so that this replica can go on renewing by itself should the store go down.
        Never logs in."""
        if self._refresh is not None or not self.can_login or self._logins.running(_LOGIN):
            return
        token = self._adopt(await self.credential.peek())
        if token is not None:
            self._hold(token, adopted=True)

    def _hold(self, token: Token, *, adopted: bool) -> None:
        self._refresh = token
        self._last_refresh = token.value
        self._refresh_renew_at = token.refresh_at(self._rng)
        log.info(
            "refresh token taken from the shared store" if adopted else "logged in",
            extra={
                "event": "refresh_token_shared" if adopted else "login",
                "upstream": self._upstream,
                "fingerprint": token.fingerprint,
                "expires_at": round(token.wall_expires_at, 3),
                "workspaces": len(self.workspaces),
            },
        )
        if self._renew_task is None:
            self._renew_task = asyncio.ensure_future(self._renew_loop())

    def _adopt(self, shared: Shared | None) -> Token | None:
        """The refresh token another replica logged in for, unless it is the one we are
        replacing or has less than a quarter of its life left."""
        if shared is None or not shared.fresh() or shared.value == self._last_refresh:
            return None
        workspaces = shared.extra.get("workspaces")
        if isinstance(workspaces, dict):
            self.workspaces = {str(k): str(v) for k, v in workspaces.items()}
        return shared.token()

    async def _login_once(self, email: str, password: Secret) -> Token:
        requested_at, wall_at = self._clock.monotonic(), self._clock.wall()
        resp = await call_token_endpoint(
            self._session,
            "POST",
            f"{self._base}/auth/login",
            json_body={"email": email, "password": password.reveal(), "rememberMe": True},
            headers={"Accept": "application/json"},
            timeout=self._timeout,
            ssl_context=self._ssl,
        )
        if resp.status in (400, 401, 403):
            raise CredentialRejected("LOGIN_REJECTED", f"login answered {resp.status}")
        if resp.status != 200:
            raise status_error(resp, "login")
        value = dig(resp.body, "refresh_token")
        if not isinstance(value, str) or not value:
            raise TokenFetchError("BAD_RESPONSE", "login response has no refresh_token")
        workspaces = dig(resp.body, "workspaces")
        if isinstance(workspaces, list):
            # Samples name the id field either workspaceId or id.
            self.workspaces = {
                str(w.get("workspaceId") or w.get("id")): str(w.get("name", ""))
                for w in workspaces
                if isinstance(w, dict) and (w.get("workspaceId") or w.get("id"))
            }
        return jwt_token(
            value,
            reference_time=resp.server_time,
            requested_at=requested_at,
            wall_requested_at=wall_at,
            what="royalti refresh token",
            skew=self._skew,
        )

    async def _renew_loop(self) -> None:
        """Log in again ahead of the refresh token's expiry, whether or not traffic asks."""
        while True:
            due = self._refresh_renew_at
            if due is None:
                return
            now = self._clock.monotonic()
            if now < due:
                await self._clock.sleep(due - now)
                continue
            try:
                await self._login()
            except TokenFetchError:
                # Backing off: try again once the backoff has passed.
                self._refresh_renew_at = max(self._login_not_before, self._clock.monotonic() + 1)

    # -- status and shutdown ------------------------------------------------------------------

    def status(self) -> CredentialStatus:
        token = self._refresh
        return CredentialStatus(
            kind="refresh_token",
            fingerprint=token.fingerprint if token else None,
            wall_expires_at=token.wall_expires_at if token else None,
            renewable=self.can_login,
            last_error=self._last_error,
        )

    async def close(self) -> None:
        if self._renew_task is not None:
            self._renew_task.cancel()
            await asyncio.gather(self._renew_task, return_exceptions=True)
        await self._logins.close()
