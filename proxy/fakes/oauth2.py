"""A fake OAuth2 authorization server and protected resource, on a real socket.

Used by the tests and the demo. It behaves like VBot's ``/token`` (RFC 6749 password, refresh
and client-credentials grants, opaque tokens, rotating refresh tokens) and is strict where a real
server may be strict, so that a client bug shows up as a failing test:

- every refresh token is single-use; presenting a spent one is answered ``invalid_grant`` and
  counted in :attr:`FakeOAuth2.reused_refresh_tokens`;
- client authentication follows RFC 6749 §2.3.1 exactly (form-urlencoded before Basic encoding),
  and using two methods at once is an ``invalid_request``;
- access tokens expire on the fake's own wall clock, which tests move by hand.
"""

from __future__ import annotations

import base64
import binascii
import collections
import email.utils
import json
import secrets
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import unquote_plus

import jwt
from aiohttp import web

#: A canned answer for :attr:`FakeOAuth2.fail_next`: ``(status, body)`` or
#: ``(status, body, headers)``; a body of None is sent as an empty body.
CannedResponse: TypeAlias = (
    tuple[int, dict[str, Any] | None] | tuple[int, dict[str, Any] | None, Mapping[str, str]]
)


@dataclass(slots=True)
class _Access:
    issued_at: float
    expires_in: int
    chain: str
    revoked: bool = False


@dataclass(slots=True)
class _Grant:
    """What a refresh token stands for."""

    client_id: str | None
    username: str
    scope: str | None
    chain: str


class _OAuthError(Exception):
    def __init__(self, status: int, error: str, description: str, *, basic: bool = False):
        super().__init__(error)
        self.status = status
        self.error = error
        self.description = description
        self.basic = basic


class FakeOAuth2:
    """An OAuth2 token endpoint (``POST /token``) and a protected API (``ANY /api/...``).

    ``clients`` maps a client id to its secret, or to None for a public client (which sends its
    id and no secret). With no clients configured, client authentication is not required (as at
    VBot). ``users`` maps usernames to passwords for the password grant.

    Knobs, all plain attributes that tests change between calls: :attr:`fail_next`,
    :attr:`token_type`, :attr:`send_expires_in`, :attr:`expires_in`, and the methods
    :meth:`revoke_all_refresh_tokens` and :meth:`revoke_all_access_tokens`.
    """

    def __init__(
        self,
        *,
        clients: Mapping[str, str | None],
        users: Mapping[str, str],
        expires_in: int = 899,
        jwt_tokens: bool = False,
        wall: Callable[[], float] = time.time,
        revoke_old_access_on_refresh: bool = False,
        expired_token_status: int = 401,
        token_type: str = "bearer",  # noqa: S107 - a token type, not a password
        send_expires_in: bool = True,
    ) -> None:
        self.clients = dict(clients)
        self.users = dict(users)
        self.expires_in = expires_in
        self.jwt_tokens = jwt_tokens
        self.wall = wall
        self.revoke_old_access_on_refresh = revoke_old_access_on_refresh
        self.expired_token_status = expired_token_status
        #: The ``token_type`` sent with every token.
        self.token_type = token_type
        #: Whether token answers carry ``expires_in`` (tokens expire after it either way).
        self.send_expires_in = send_expires_in

        #: Answers to give, in order, to the next calls to ``/token`` instead of processing them.
        self.fail_next: list[CannedResponse] = []
        #: Token-endpoint calls by ``grant_type`` (``""`` when it was missing).
        self.calls: collections.Counter[str] = collections.Counter()
        #: How each token-endpoint call authenticated the client: basic, post or none.
        self.client_auth_seen: list[str] = []
        #: Every token-endpoint form, as received.
        self.forms: list[dict[str, str]] = []
        #: Every token-endpoint call's headers, as received.
        self.headers_seen: list[dict[str, str]] = []
        #: Spent refresh tokens presented again: a correct client keeps this at 0.
        self.reused_refresh_tokens = 0
        #: Access tokens issued, oldest first.
        self.issued: list[str] = []
        #: Refresh tokens issued, oldest first.
        self.refresh_issued: list[str] = []
        #: Which header each API call authenticated with: ``authorization`` or ``x-api-key``.
        self.auth_headers_seen: list[str] = []
        #: API calls answered (whatever the outcome).
        self.api_calls = 0

        self._refresh: dict[str, _Grant] = {}
        self._spent_refresh: set[str] = set()
        self._revoked_refresh: set[str] = set()
        self._access: dict[str, _Access] = {}
        self._chain_access: dict[str, str] = {}
        self._jwt_key = secrets.token_bytes(32)

        self.app = web.Application()
        self.app.router.add_post("/token", self._token)
        self.app.router.add_route("*", "/api/{tail:.*}", self._api)
        self.app.on_response_prepare.append(self._date)

    # -- knobs ----------------------------------------------------------------------------------

    def revoke_all_refresh_tokens(self) -> None:
        """Make every outstanding refresh token invalid (not counted as reuse when presented)."""
        self._revoked_refresh.update(self._refresh)
        self._refresh.clear()

    def revoke_all_access_tokens(self) -> None:
        """Make every access token issued so far invalid on the API."""
        for access in self._access.values():
            access.revoked = True

    def is_valid(self, token: str) -> bool:
        """Whether the API would accept ``token`` now."""
        access = self._access.get(token)
        return access is not None and not access.revoked and self.wall() < self._expiry(access)

    # -- token endpoint -------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        post = await request.post()
        form = {k: v for k, v in post.items() if isinstance(v, str)}
        grant_type = form.get("grant_type", "")
        self.calls[grant_type] += 1
        self.forms.append(form)
        self.headers_seen.append(dict(request.headers))
        basic = request.headers.get("Authorization", "")[:6].lower() == "basic "
        method = "basic" if basic else "post" if "client_secret" in form else "none"
        self.client_auth_seen.append(method)
        if self.fail_next:
            return _canned(self.fail_next.pop(0))
        try:
            client_id = self._authenticate(request, form, method)
            if request.content_type != "application/x-www-form-urlencoded":
                raise _OAuthError(400, "invalid_request", "form-urlencoded body expected")
            if grant_type == "password":
                grant = self._password(form, client_id)
            elif grant_type == "refresh_token":
                grant = self._use_refresh(form, client_id)
            elif grant_type == "client_credentials":
                if method == "none" or client_id is None:
                    raise _OAuthError(400, "unauthorized_client", "public clients cannot")
                return self._issue(
                    _Grant(client_id, "", form.get("scope"), uuid.uuid4().hex), refresh=False
                )
            elif not grant_type:
                raise _OAuthError(400, "invalid_request", "grant_type is missing")
            else:
                raise _OAuthError(400, "unsupported_grant_type", "not supported here")
        except _OAuthError as exc:
            return self._error(exc)
        return self._issue(grant, refresh=True)

    def _authenticate(
        self, request: web.Request, form: Mapping[str, str], method: str
    ) -> str | None:
        """The authenticated client id (None for an anonymous caller when no client is
        registered); RFC 6749 §2.3: at most one method per request."""
        if method == "basic":
            header = request.headers["Authorization"]
            if "client_secret" in form:
                raise _OAuthError(400, "invalid_request", "two client authentication methods")
            try:
                pair = base64.b64decode(header[6:].strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise _OAuthError(401, "invalid_client", "malformed Basic", basic=True) from None
            raw_id, sep, raw_secret = pair.partition(":")
            if not sep:
                raise _OAuthError(401, "invalid_client", "malformed Basic", basic=True)
            # RFC 6749 §2.3.1: both parts are form-urlencoded inside the Basic credentials.
            basic_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
            if form.get("client_id", basic_id) != basic_id:
                raise _OAuthError(400, "invalid_request", "client_id differs from Basic")
            self._check_client(basic_id, secret, basic=True)
            return basic_id
        client_id = form.get("client_id")
        if method == "post":
            if client_id is None:
                raise _OAuthError(400, "invalid_request", "client_secret without client_id")
            self._check_client(client_id, form["client_secret"], basic=False)
            return client_id
        if not self.clients:
            return client_id
        # Only a registered public client (secret None) may go without authentication.
        if client_id is None or client_id not in self.clients or self.clients[client_id]:
            raise _OAuthError(400, "invalid_client", "client authentication required")
        return client_id

    def _check_client(self, client_id: str, secret: str, *, basic: bool) -> None:
        expected = self.clients.get(client_id)
        if expected is None or not secrets.compare_digest(expected.encode(), secret.encode()):
            # RFC 6749 §5.2: 401 with a challenge when the client used the Authorization header.
            raise _OAuthError(
                401 if basic else 400, "invalid_client", "client authentication failed", basic=basic
            )

    def _password(self, form: Mapping[str, str], client_id: str | None) -> _Grant:
        username, password = form.get("username"), form.get("password")
        if username is None or password is None:
            raise _OAuthError(400, "invalid_request", "username and password are required")
        expected = self.users.get(username)
        if expected is None or not secrets.compare_digest(expected.encode(), password.encode()):
            raise _OAuthError(400, "invalid_grant", "the user name or password is incorrect")
        return _Grant(client_id, username, form.get("scope"), uuid.uuid4().hex)

    def _use_refresh(self, form: Mapping[str, str], client_id: str | None) -> _Grant:
        token = form.get("refresh_token")
        if not token:
            raise _OAuthError(400, "invalid_request", "refresh_token is required")
        if token in self._spent_refresh:
            self.reused_refresh_tokens += 1
            raise _OAuthError(400, "invalid_grant", "refresh token already used")
        grant = self._refresh.pop(token, None)
        if grant is None:
            raise _OAuthError(400, "invalid_grant", "refresh token unknown or revoked")
        self._spent_refresh.add(token)
        # RFC 6749 §6: the refresh token must have been issued to the authenticated client.
        if grant.client_id != client_id:
            raise _OAuthError(400, "invalid_grant", "refresh token issued to another client")
        if self.revoke_old_access_on_refresh:
            old = self._access.get(self._chain_access.get(grant.chain, ""))
            if old is not None:
                old.revoked = True
        return grant

    def _issue(self, grant: _Grant, *, refresh: bool) -> web.Response:
        now = self.wall()
        if self.jwt_tokens:
            claims = {
                "sub": grant.username or grant.client_id or "anonymous",
                "iat": int(now),
                "exp": int(now) + self.expires_in,
                "jti": uuid.uuid4().hex,
            }
            value = jwt.encode(claims, self._jwt_key, algorithm="HS256")
        else:
            value = secrets.token_urlsafe(32)
        self._access[value] = _Access(now, self.expires_in, grant.chain)
        self._chain_access[grant.chain] = value
        self.issued.append(value)
        body: dict[str, Any] = {"access_token": value, "token_type": self.token_type}
        if self.send_expires_in:
            body["expires_in"] = self.expires_in
        # RFC 6749 §4.4.3: no refresh token for the client-credentials grant.
        if refresh:
            new_refresh = str(uuid.uuid4())
            self._refresh[new_refresh] = grant
            self.refresh_issued.append(new_refresh)
            body["refresh_token"] = new_refresh
        if grant.scope:
            body["scope"] = grant.scope
        # RFC 6749 §5.1: token answers must not be cached.
        return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _error(self, exc: _OAuthError) -> web.Response:
        headers = {"Cache-Control": "no-store"}
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="fake-oauth2"'
        body = {"error": exc.error, "error_description": exc.description}
        return web.json_response(body, status=exc.status, headers=headers)

    # -- protected resource ---------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        self.api_calls += 1
        header = request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            self.auth_headers_seen.append("authorization")
            token = header[7:].strip()
        elif "X-API-Key" in request.headers:
            self.auth_headers_seen.append("x-api-key")
            token = request.headers["X-API-Key"]
        else:
            return _bearer_error(401, None, "no credentials")
        access = self._access.get(token)
        if access is None:
            return _bearer_error(401, "invalid_token", "unknown token")
        if access.revoked or self.wall() >= self._expiry(access):
            return _bearer_error(self.expired_token_status, "invalid_token", "token expired")
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.json_response(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": dict(request.headers),
                "body_length": size,
            }
        )

    @staticmethod
    def _expiry(access: _Access) -> float:
        return access.issued_at + access.expires_in

    async def _date(self, request: web.Request, response: web.StreamResponse) -> None:
        # The fake's clock is the one tests move: its Date header must agree with it.
        response.headers["Date"] = email.utils.formatdate(self.wall(), usegmt=True)


def _canned(canned: CannedResponse) -> web.Response:
    status, body = canned[0], canned[1]
    headers = dict(canned[2]) if len(canned) == 3 else {}
    if body is None:
        return web.Response(status=status, headers=headers)
    headers.setdefault("Content-Type", "application/json")
    return web.Response(status=status, body=json.dumps(body).encode(), headers=headers)


def _bearer_error(status: int, error: str | None, description: str) -> web.Response:
    # RFC 6750 §3: the challenge names the error when the request carried a token.
    challenge = 'Bearer realm="fake-oauth2"'
    if error:
        challenge += f', error="{error}", error_description="{description}"'
    return web.json_response(
        {"error": error or "unauthorized", "error_description": description},
        status=status,
        headers={"WWW-Authenticate": challenge},
    )


async def start_fake_oauth2(
    fake: FakeOAuth2,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, str]:
    """Serve ``fake`` on a real socket; returns the runner (call ``cleanup()``) and the base URL,
    ``http://`` or ``https://`` according to ``ssl_context``."""
    runner = web.AppRunner(fake.app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound_port = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    scheme = "https" if ssl_context is not None else "http"
    return runner, f"{scheme}://{host}:{bound_port}"
