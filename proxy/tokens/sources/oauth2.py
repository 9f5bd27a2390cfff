"""Tokens from a plain OAuth2 token endpoint: the password grant (with rotating refresh tokens,
as VBot's ``/token``) or the client-credentials grant (RFC 6749 §4.3, §4.4, §6)."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import re
import ssl
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import quote_plus

import aiohttp

from proxy.clock import Clock
from proxy.config import OAuth2Auth
from proxy.errors import CredentialRejected, TokenFetchError
from proxy.secret import Secret
from proxy.tokens.shared import LOCAL, CredentialHold, CredentialStore
from proxy.tokens.source import SINGLE_KEY, CredentialStatus, FetchObserver, ignore, observed
from proxy.tokens.sources.http import JsonResponse, call_token_endpoint, status_error
from proxy.tokens.token import SkewNotice, Token, fingerprint, jwt_lifetime, make_token

log = logging.getLogger("proxy.tokens")

Grant = Literal["password", "client_credentials"]

WHAT = "oauth2 token endpoint"

# RFC 6749 §5.2: error codes are limited to %x20-21 / %x23-5B / %x5D-7E. Anything else is not
# an OAuth2 error code, and is not echoed into our messages.
_ERROR_CODE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]{1,64}")
_MAX_DESCRIPTION = 200

# What the issuer's error means for us (RFC 6749 §5.2).
_CLIENT_REJECTED = frozenset({"invalid_client", "unauthorized_client"})


class _OAuth2Error(TokenFetchError):
    """An RFC 6749 §5.2 error answer, before the grant that got it decides what it means."""

    def __init__(self, error: str, message: str, *, retry_after: float | None) -> None:
        super().__init__(error, message, retry_after=retry_after)


class OAuth2Source:
    """Fetches access tokens from an OAuth2 token endpoint.

    With ``grant="password"`` the first fetch sends the resource owner's password; when the answer
    carries a refresh token, the next fetch sends ``grant_type=refresh_token`` instead. Refresh
    tokens are assumed to rotate: only the newest is kept, and each is sent at most once (it is
    forgotten the moment it is sent, so a refresh that fails in flight, whose fate is unknown,
    is followed by a password grant rather than by a replay). A refused refresh token
    (``invalid_grant``) is replaced by one password grant within the same fetch; an issuer that
    answers ``unsupported_grant_type`` to the refresh grant gets password grants from then on.

    With a shared token store (``credential``, see :mod:`proxy.tokens.shared`) the refresh token
    lives in the store: a fetch takes it from there under the store's lease, marking it spent
    before sending it, and stores the new one before the lease is released; a local copy is
    sent only if the store never had it.

    With ``grant="client_credentials"`` every fetch is a client-credentials grant.

    The key is always :data:`~proxy.tokens.source.SINGLE_KEY`. Errors are
    :class:`~proxy.errors.TokenFetchError`; a refused client or password is
    :class:`~proxy.errors.CredentialRejected` (code ``invalid_client``, ``unauthorized_client``,
    ``invalid_grant`` or ``HTTP_401``); a 429 is :class:`~proxy.errors.RateLimited`.
    """

    per_workspace = False

    def __init__(
        self,
        *,
        settings: OAuth2Auth,
        timeout: float,
        session: aiohttp.ClientSession,
        clock: Clock,
        ssl_context: ssl.SSLContext | None = None,
        observer: FetchObserver = ignore,
        credential: CredentialStore = LOCAL,
    ) -> None:
        """``settings`` as :func:`proxy.config.load` validated them: they are not checked again."""
        grant, client_id, client_secret = settings.grant, settings.client_id, settings.client_secret
        client_auth, username, password = settings.client_auth, settings.username, settings.password
        self.kind = f"oauth2_{grant}"
        self.grant: Grant = grant
        self.token_url = settings.token_url
        # Secrets stay wrapped in Secret until the request is built, so that no repr, debugger
        # or crash reporter showing this object's state shows them.
        self._owner: dict[str, str | Secret] = (
            {"username": username, "password": password} if username and password else {}
        )
        self._scope = settings.scope
        self._default_lifetime = settings.default_lifetime
        self._timeout = timeout
        self._session = session
        self._clock = clock
        self._ssl_context = ssl_context
        # Scrubbed from anything the issuer echoes back at us.
        self._secrets = tuple(s for s in (client_secret, password) if s)

        headers: dict[str, str | Secret] = dict(settings.extra_headers)
        headers["Accept"] = "application/json"
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        form: dict[str, str | Secret] = dict(settings.extra_params)
        if client_auth == "basic" and client_id and client_secret:
            headers["Authorization"] = Secret(_basic(client_id, client_secret.reveal()))
        elif client_auth == "post" and client_id and client_secret:
            form["client_id"] = client_id
            form["client_secret"] = client_secret
        elif client_id:
            form["client_id"] = client_id
        self._headers = headers
        self._base_form = form

        self._refresh_token: Secret | None = None
        # True when the shared store holds (or may hold) _refresh_token: the local copy is then
        # never sent, since another replica may have sent it already.
        self._refresh_shared = False
        self.credential = credential
        """Where the rotating refresh token is kept."""
        self._refresh_supported = True
        self._lock = asyncio.Lock()
        self._warned_default_lifetime = False
        self._skew = SkewNotice(self.kind)
        self._last_error: str | None = None
        self.observer = observer

    async def fetch(self, key: str) -> Token:
        if key != SINGLE_KEY:
            raise ValueError(f"{self.kind} tokens are not per workspace (key {key!r})")
        # The manager never fetches twice at once; the lock makes sure of it, because two
        # concurrent refreshes would spend one rotating refresh token twice.
        async with self._lock:
            try:
                token = await self._fetch()
            except TokenFetchError as exc:
                self._last_error = exc.code
                raise
            self._last_error = None
            return token

    def credential_status(self) -> CredentialStatus:
        # A password is never fingerprinted: a short hash of a guessable secret is an oracle.
        refresh = self._refresh_token
        if refresh is not None:
            kind, print_ = "refresh_token", fingerprint(refresh.reveal())
        else:
            kind, print_ = self.grant, None
        return CredentialStatus(
            kind=kind,
            fingerprint=print_,
            wall_expires_at=None,
            renewable=True,
            last_error=self._last_error,
        )

    async def close(self) -> None:
        return None

    async def _fetch(self) -> Token:
        if self.grant == "client_credentials":
            return await self._call("client_credentials", {})
        async with self.credential.lock() as held:
            try:
                return await self._owner_grant(await self._take_refresh(held))
            finally:
                if self._refresh_token is not None:
                    self._refresh_shared = await held.save(
                        self._refresh_token.reveal(), lifetime=None
                    )

    async def _take_refresh(self, held: CredentialHold) -> Secret | None:
        """The refresh token to send, forgotten the moment it is chosen: each is sent once. The
        store's is the newest; a local one only if the store never had it."""
        taken = await held.take()
        local, shared = self._refresh_token, self._refresh_shared
        self._refresh_token, self._refresh_shared = None, False
        if taken is not None:
            return Secret(taken.value)
        return None if shared else local

    async def _owner_grant(self, refresh: Secret | None) -> Token:
        if refresh is not None and self._refresh_supported:
            try:
                return await self._call("refresh_token", {"refresh_token": refresh})
            except _OAuth2Error as exc:
                if exc.code == "unsupported_grant_type":
                    # The issuer hands out refresh tokens it will not take back: stop trying.
                    self._refresh_supported = False
                elif exc.code != "invalid_grant":
                    raise self._meaning(exc, password_grant=False) from None
                log.info(
                    "oauth2 refresh token refused, falling back to the password grant",
                    extra={"event": "oauth2_refresh_refused", "error": exc.code},
                )
        return await self._call("password", self._owner)

    async def _call(self, grant_type: str, fields: Mapping[str, str | Secret]) -> Token:
        kind = "refresh" if grant_type == "refresh_token" else grant_type
        return await observed(self.observer, kind, self._grant(grant_type, fields))

    async def _grant(self, grant_type: str, fields: Mapping[str, str | Secret]) -> Token:
        """One grant; :class:`_OAuth2Error` escapes only from the refresh grant, for the caller
        to decide what a refused refresh token means."""
        form = {**self._base_form, "grant_type": grant_type, **fields}
        # On a refresh, an omitted scope means the one originally granted (RFC 6749 §6).
        if self._scope and grant_type != "refresh_token":
            form["scope"] = self._scope
        requested_at = self._clock.monotonic()
        wall_requested_at = self._clock.wall()
        resp = await call_token_endpoint(
            self._session,
            "POST",
            self.token_url,
            headers=_reveal(self._headers),
            form=_reveal(form),
            timeout=self._timeout,
            ssl_context=self._ssl_context,
        )
        body = resp.body if isinstance(resp.body, dict) else None
        try:
            if resp.status == 200 and body is not None and "access_token" in body:
                return self._token(resp, body, requested_at, wall_requested_at)
            # The refresh token just sent is a secret too, should the issuer echo it back.
            sent = (v for v in fields.values() if isinstance(v, Secret))
            secrets = [s.reveal() for s in (*self._secrets, *sent)]
            raise self._error(resp, body, secrets)
        except _OAuth2Error as exc:
            if grant_type == "refresh_token":
                raise
            raise self._meaning(exc, password_grant=grant_type == "password") from None

    def _token(
        self,
        resp: JsonResponse,
        body: dict[str, Any],
        requested_at: float,
        wall_requested_at: float,
    ) -> Token:
        # Keep the newest refresh token even if the access token turns out unusable: the
        # issuer has already rotated, and the one we sent is spent.
        new_refresh = body.get("refresh_token")
        if (
            self.grant == "password"
            and self._refresh_supported
            and isinstance(new_refresh, str)
            and new_refresh
        ):
            self._refresh_token = Secret(new_refresh)

        value = body.get("access_token")
        if not isinstance(value, str) or not value:
            raise TokenFetchError("BAD_RESPONSE", f"{WHAT} sent no access_token string")
        token_type = body.get("token_type")
        # RFC 6749 §7.1: the type is case-insensitive; we only know how to send bearer tokens.
        if token_type is not None and (
            not isinstance(token_type, str) or token_type.lower() != "bearer"
        ):
            raise TokenFetchError("BAD_TOKEN_TYPE", f"{WHAT} issued a non-bearer token")
        return make_token(
            value,
            lifetime=self._lifetime(value, body, resp.server_time, wall_requested_at),
            requested_at=requested_at,
            wall_requested_at=wall_requested_at,
            what="oauth2 access token",
        )

    def _lifetime(
        self, value: str, body: dict[str, Any], server_time: float | None, local_wall: float
    ) -> float:
        expires_in = _seconds(body.get("expires_in"))
        if expires_in is not None:
            return expires_in
        if "expires_in" in body and body["expires_in"] is not None:
            log.warning(
                "oauth2 expires_in is not a number, ignored",
                extra={"event": "oauth2_bad_expires_in"},
            )
        if value.count(".") == 2:
            try:
                lifetime, _ = jwt_lifetime(
                    value, server_time=server_time, local_wall=local_wall, skew=self._skew
                )
            except TokenFetchError:
                pass  # a JWT without exp, or not a JWT after all
            else:
                return lifetime
        if not self._warned_default_lifetime:
            self._warned_default_lifetime = True
            log.warning(
                "oauth2 token has no expires_in and no exp, using the default lifetime",
                extra={
                    "event": "oauth2_default_lifetime",
                    "default_lifetime": self._default_lifetime,
                },
            )
        return self._default_lifetime

    def _error(
        self, resp: JsonResponse, body: dict[str, Any] | None, secrets: list[str]
    ) -> TokenFetchError:
        """The error for an answer that carries no token."""
        if resp.status == 429 or resp.status >= 500:
            return status_error(resp, WHAT)
        error = body.get("error") if body is not None else None
        if isinstance(error, str) and error:
            leaks = any(s in error for s in secrets)
            code = error if _ERROR_CODE.fullmatch(error) and not leaks else None
            if code is None:
                return TokenFetchError(
                    "BAD_RESPONSE", f"{WHAT} answered {resp.status} with a malformed error"
                )
            message = f"{WHAT} answered {resp.status} {code}"
            description = body.get("error_description") if body is not None else None
            if isinstance(description, str) and description:
                message += f": {_scrub(description, secrets)}"
            return _OAuth2Error(code, message, retry_after=resp.retry_after)
        if resp.status == 401:
            # A 401 without an RFC 6749 body still means the client authentication failed.
            return CredentialRejected(
                "HTTP_401", f"{WHAT} answered 401", retry_after=resp.retry_after
            )
        if resp.status == 200:
            return TokenFetchError("BAD_RESPONSE", f"{WHAT} answered 200 without an access_token")
        return status_error(resp, WHAT)

    def _meaning(self, exc: _OAuth2Error, *, password_grant: bool) -> TokenFetchError:
        """What an RFC 6749 §5.2 error means: a refused credential will not heal by retrying."""
        if exc.code in _CLIENT_REJECTED or (password_grant and exc.code == "invalid_grant"):
            return CredentialRejected(exc.code, exc.message, retry_after=exc.retry_after)
        return TokenFetchError(exc.code, exc.message, retry_after=exc.retry_after)


def _reveal(fields: Mapping[str, str | Secret]) -> dict[str, str]:
    return {k: v.reveal() if isinstance(v, Secret) else v for k, v in fields.items()}


def _scrub(text: str, secrets: list[str]) -> str:
    """An issuer's free-text error description, made safe to put in a message: without any
    secret it might echo back, printable ASCII, bounded."""
    for secret in secrets:
        text = text.replace(secret, "***")
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    if len(text) > _MAX_DESCRIPTION:
        text = text[:_MAX_DESCRIPTION] + "..."
    return text


def _basic(client_id: str, client_secret: str) -> str:
    """RFC 6749 §2.3.1: id and secret are form-urlencoded *before* the RFC 7617 Basic encoding,
    so a ``:`` in the id or a ``+`` in the secret survive."""
    pair = f"{quote_plus(client_id)}:{quote_plus(client_secret)}"
    return "Basic " + base64.b64encode(pair.encode("ascii")).decode("ascii")


def _seconds(value: object) -> float | None:
    """``expires_in`` as seconds: a JSON number or a numeric string (some issuers quote it)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return seconds if math.isfinite(seconds) else None
