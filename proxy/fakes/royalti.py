"""An embedded fake of the Royalti.io API, used by ``royalti-proxy demo`` and by the test suite.

It is a real :mod:`aiohttp` application on a real socket (fakes over mocks), modelled on the facts
in ``UPSTREAMS.md``: the three-tier credential chain (``POST /auth/login`` → refresh token →
``GET /auth/authtoken`` → one access token per workspace), workspace API keys, the error envelope,
and the traffic shapes the proxy must carry (lists, multipart uploads, large streamed downloads,
Server-Sent Events).

Everything a test needs to observe or to break is a public attribute of :class:`FakeRoyalti`:
counters (``login_calls``, ``authtoken_calls``, ``api_calls``, ``expired_seen``, ``unauthorized``),
what was received (``tokens_seen``, ``requests``), and fault knobs (``login_failures``,
``authtoken_failures``, ``revoke_refresh_tokens()``, ``revoke_access_token()``,
``reject_all_access_before``, ``sse_gate``). Time is the injected ``wall`` clock only, so tests of
expiry and clock skew never sleep.

Nothing here is secret: the signing key is a fixed, public test value. The API endpoints are in
:mod:`proxy.fakes.royalti_api`, the error envelope in :mod:`proxy.fakes.royalti_envelope`, the JWTs
in :mod:`proxy.fakes.royalti_jwt`; this module is the fake itself, and what tests import.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from proxy.fakes import royalti_api as api
from proxy.fakes.royalti_api import BODY, WORKSPACE, csv_bytes, drain
from proxy.fakes.royalti_envelope import Failure, injected, status_code, unauthorized
from proxy.fakes.royalti_jwt import REFRESH_NAME, bearer, decode, encode, expired

__all__ = [
    "DEFAULT_SECRET",
    "DEFAULT_WORKSPACES",
    "FAKE_ROYALTI_KEY",
    "FakeRoyalti",
    "RecordedRequest",
    "csv_bytes",
    "start_fake",
]

DEFAULT_WORKSPACES: tuple[tuple[str, str], ...] = (
    ("786acdf7-fa3e-4ab2-91d5-13f0b6a8ad97", "Demo Label"),
    ("ws-beta", "Beta Records"),
    ("ws-gamma", "Gamma Publishing"),
    ("ws-delta", "Delta Distribution"),
)
"""The workspaces ``(id, name)`` every user of the fake belongs to, unless told otherwise."""

DEFAULT_SECRET = "fake-royalti-secret"
"""The fake's HS256 signing key: a public test value, not a secret."""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request received on a non-``/auth/`` endpoint, as the fake saw it.

    ``headers`` are in received order with their received case. ``body_sha256`` is ``None`` only
    for ``POST /file/royalty``, whose body is parsed part by part rather than read raw (the
    response reports each part's digest); ``body_len`` is always the raw body length.
    """

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_len: int
    body_sha256: str | None


class FakeRoyalti:
    """A fake Royalti.io API: the credential chain, API keys, and the proxied endpoints.

    ``wall`` is the fake server's own clock (seconds since the epoch): it stamps ``iat``/``exp``
    and decides expiry, so tests can skew it against the proxy's clock. Tokens are HS256 JWTs
    signed with ``secret``. Every user in ``users`` (email → password) belongs to every workspace
    in ``workspaces``; each key of ``api_keys`` resolves to one workspace. Access tokens omit
    ``iat`` when ``omit_iat`` is set (a server that does not send it). ``jwt_offset`` and
    ``date_offset`` (seconds, default 0) set the issuer's clock (``iat``/``exp`` and expiry) and
    the clock that stamps the ``Date`` header apart from ``wall`` and from each other, as when a
    front end or a CDN with its own clock sits before the issuer.

    Attributes to observe: ``login_calls``, ``authtoken_calls`` (by requested workspace),
    ``last_user_id`` (the last ``userId`` query sent to authtoken), ``api_calls`` (requests to any
    non-``/auth/`` endpoint), ``expired_seen``, ``unauthorized`` (non-``/auth/`` responses with
    status 401, whatever the reason), ``tokens_seen`` (every ``Authorization`` value received on
    non-``/auth/`` endpoints) and ``requests``.

    Knobs: ``login_failures`` / ``authtoken_failures`` (``(status, retry_after)`` answered, in
    order, by the next calls, before anything else is checked), ``revoked_refresh`` /
    :meth:`revoke_refresh_tokens`, ``revoked_access`` / :meth:`revoke_access_token`,
    ``reject_all_access_before`` (on the issuer's clock, ``jwt_wall``: access tokens issued
    before it are refused),
    ``sse_gate`` and ``sse_interval`` (pacing of ``POST /ai/chat``).
    """

    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.time,
        secret: str = DEFAULT_SECRET,
        users: Mapping[str, str] | None = None,
        workspaces: Sequence[tuple[str, str]] = DEFAULT_WORKSPACES,
        api_keys: Mapping[str, str] | None = None,
        access_lifetime: float = 6 * 3600,
        refresh_lifetime: float = 86400,
        login_limit: int = 20,
        login_window: float = 180.0,
        omit_iat: bool = False,
        jwt_offset: float = 0.0,
        date_offset: float = 0.0,
    ) -> None:
        if not workspaces:
            raise ValueError("workspaces must not be empty")
        self.wall = wall
        self.secret = secret
        self.users: dict[str, str] = (
            dict(users) if users is not None else {"ops@example.com": "correct-horse"}
        )
        self.workspaces: dict[str, str] = dict(workspaces)
        self.api_keys: dict[str, str] = (
            dict(api_keys) if api_keys is not None else {"RWAK-demo-key": workspaces[0][0]}
        )
        self.access_lifetime = access_lifetime
        self.refresh_lifetime = refresh_lifetime
        self.login_limit = login_limit
        self.login_window = login_window
        self.omit_iat = omit_iat
        self.jwt_offset = jwt_offset
        self.date_offset = date_offset

        # Observations.
        self.login_calls = 0
        self.authtoken_calls: collections.Counter[str] = collections.Counter()
        self.last_user_id: str | None = None
        self.api_calls = 0
        self.expired_seen = 0
        self.unauthorized = 0
        self.tokens_seen: list[str] = []
        self.requests: list[RecordedRequest] = []

        # Fault knobs.
        self.login_failures: list[tuple[int, float | None]] = []
        self.authtoken_failures: list[tuple[int, float | None]] = []
        self.revoked_refresh: set[str] = set()
        self.revoked_access: set[str] = set()
        self.reject_all_access_before: float | None = None
        self.sse_gate: asyncio.Queue[None] | None = None
        self.sse_interval = 0.3

        self._login_times: collections.deque[float] = collections.deque()
        self._issued_refresh: list[str] = []
        # Exact wall time each access token was issued, by jti: ``iat`` is whole seconds (and may
        # be omitted), too coarse to compare with ``reject_all_access_before``.
        self._issued_at: dict[str, float] = {}
        self.app = self._make_app()

    # -- tokens ---------------------------------------------------------------------------------

    def user_id(self, email: str) -> str:
        """The stable user id the fake gives ``email``."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://fake.royalti.invalid/user/{email}"))

    def issue_refresh_token(self, email: str = "ops@example.com") -> str:
        """Mint a refresh token as ``POST /auth/login`` would (for operator-supplied tokens)."""
        iat = int(self.jwt_wall())
        token = encode(
            {
                "id": self.user_id(email),
                "name": REFRESH_NAME,
                "iat": iat,
                "exp": iat + int(self.refresh_lifetime),
                "jti": uuid.uuid4().hex,
            },
            self.secret,
        )
        self._issued_refresh.append(token)
        return token

    def issue_access_token(self, workspace: str, email: str = "ops@example.com") -> str:
        """Mint an access token for ``workspace`` as ``GET /auth/authtoken`` would."""
        now = self.jwt_wall()
        iat = int(now)
        jti = uuid.uuid4().hex
        claims: dict[str, Any] = {
            "id": self.user_id(email),
            "name": email,
            "activeWorkspace": workspace,
            "iat": iat,
            "exp": iat + int(self.access_lifetime),
            "jti": jti,
        }
        if self.omit_iat:
            del claims["iat"]
        self._issued_at[jti] = now
        return encode(claims, self.secret)

    def jwt_wall(self) -> float:
        """The issuer's clock: ``wall`` plus ``jwt_offset``."""
        return self.wall() + self.jwt_offset

    def revoke_refresh_tokens(self) -> None:
        """Revoke every refresh token issued so far: authtoken then answers 401 for them."""
        self.revoked_refresh.update(self._issued_refresh)

    def revoke_access_token(self, token: str) -> None:
        """Revoke one access token: API endpoints then answer 401 for it."""
        self.revoked_access.add(token)

    def _authorise(self, request: web.Request) -> str:
        """The workspace an API request acts in, or a 401 failure."""
        token = bearer(request)
        if token in self.api_keys:
            return self.api_keys[token]
        claims = decode(token, self.secret)
        workspace = claims.get("activeWorkspace")
        if claims.get("name") == REFRESH_NAME or not isinstance(workspace, str):
            raise unauthorized("Not an access token")
        if expired(claims, self.jwt_wall()):
            self.expired_seen += 1
            raise unauthorized("Token expired")
        if token in self.revoked_access:
            raise unauthorized("Token revoked")
        if self.reject_all_access_before is not None:
            issued = self._issued_at.get(str(claims.get("jti")), claims.get("iat"))
            if not isinstance(issued, int | float) or issued < self.reject_all_access_before:
                raise unauthorized("Token revoked")
        return workspace

    # -- application ----------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app[FAKE_ROYALTI_KEY] = self
        app.on_response_prepare.append(self._set_date)
        router = app.router
        router.add_post("/auth/login", self._login)
        router.add_get("/auth/authtoken", self._authtoken)
        for path in ("/user/", "/asset", "/product/", "/artist/", "/royalty/dsp"):
            router.add_get(path, api.list_page)
        router.add_route("*", "/echo", api.echo)
        router.add_route("*", "/echo/{tail:.*}", api.echo)
        self._upload_route = router.add_post("/file/royalty", api.upload)
        router.add_get("/file/{id}/download", api.download)
        router.add_get("/{resource}/download/csv", api.download)
        router.add_post("/ai/chat", self._chat)
        router.add_route("*", "/status/{code}", api.status)
        return app

    async def _set_date(self, request: web.Request, response: web.StreamResponse) -> None:
        # The Date header follows the injected clock, so a client can measure skew against it.
        response.headers[hdrs.DATE] = email.utils.formatdate(
            self.wall() + self.date_offset, usegmt=True
        )

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/auth/"):
            return await self._answer(request, handler)
        self.api_calls += 1
        authorization = request.headers.get(hdrs.AUTHORIZATION)
        if authorization is not None:
            self.tokens_seen.append(authorization)
        headers = list(request.headers.items())
        if request.match_info.route is self._upload_route:
            # The upload handler parses the body itself: record it once it has been consumed.
            response = await self._answer(request, handler, authorise=True)
            await drain(request)
            self.requests.append(
                RecordedRequest(
                    request.method, request.raw_path, headers, request.content.total_bytes, None
                )
            )
        else:
            body = request[BODY] = await drain(request)
            self.requests.append(RecordedRequest(request.method, request.raw_path, headers, *body))
            response = await self._answer(request, handler, authorise=True)
        if response.status == 401:
            self.unauthorized += 1
        return response

    async def _answer(
        self, request: web.Request, handler: Handler, *, authorise: bool = False
    ) -> web.StreamResponse:
        """Run ``handler``, turning every error into Royalti's envelope."""
        try:
            if authorise:
                request[WORKSPACE] = self._authorise(request)
            return await handler(request)
        except Failure as failure:
            return failure.response()
        except web.HTTPException as exc:
            if exc.empty_body:
                raise
            envelope = Failure(exc.status, status_code(exc.status), exc.reason).response()
            for name in (hdrs.ALLOW, hdrs.LOCATION):
                if name in exc.headers:
                    envelope.headers[name] = exc.headers[name]
            return envelope

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        # The pacing knobs are read per request: a test sets them once the fake is running.
        return await api.chat(request, gate=self.sse_gate, interval=self.sse_interval)

    # -- credential chain -----------------------------------------------------------------------

    async def _login(self, request: web.Request) -> web.StreamResponse:
        self.login_calls += 1
        if self.login_failures:
            raise injected(*self.login_failures.pop(0))
        now = self.wall()
        # Sliding window over the calls that were let through ("20 requests per 3 minutes").
        while self._login_times and self._login_times[0] <= now - self.login_window:
            self._login_times.popleft()
        if len(self._login_times) >= self.login_limit:
            wait = max(1.0, self._login_times[0] + self.login_window - now)
            raise Failure(429, "TOO_MANY_REQUESTS", "Too many login attempts", retry_after=wait)
        self._login_times.append(now)
        try:
            body = await request.json()
        except ValueError:
            raise Failure(400, "VALIDATION_ERROR", "Body must be JSON") from None
        if not isinstance(body, dict):
            raise Failure(400, "VALIDATION_ERROR", "Body must be a JSON object")
        email_, password = body.get("email"), body.get("password")
        if not isinstance(email_, str) or not isinstance(password, str):
            raise Failure(400, "VALIDATION_ERROR", "email and password are required")
        if self.users.get(email_) != password:
            raise Failure(401, "INVALID_CREDENTIALS", "Invalid email or password")
        return web.json_response(
            {
                "message": "Successful",
                "workspaces": [
                    {"workspaceId": ws, "name": name, "status": "active", "role": "owner"}
                    for ws, name in self.workspaces.items()
                ],
                "refresh_token": self.issue_refresh_token(email_),
            }
        )

    async def _authtoken(self, request: web.Request) -> web.StreamResponse:
        workspace = request.query.get("currentWorkspace", "")
        self.authtoken_calls[workspace] += 1
        if "userId" in request.query:
            self.last_user_id = request.query["userId"]
        if self.authtoken_failures:
            raise injected(*self.authtoken_failures.pop(0))
        token = bearer(request)
        claims = decode(token, self.secret)
        if claims.get("name") != REFRESH_NAME:
            raise unauthorized("Not a refresh token")
        if expired(claims, self.jwt_wall()):
            raise unauthorized("Refresh token expired")
        if token in self.revoked_refresh:
            raise unauthorized("Refresh token revoked")
        if not workspace:
            raise Failure(400, "VALIDATION_ERROR", "currentWorkspace is required")
        if workspace not in self.workspaces:
            raise Failure(404, "NOT_FOUND", "Workspace not found")
        email_ = next(
            (e for e in self.users if self.user_id(e) == claims.get("id")), "ops@example.com"
        )
        return web.json_response(
            {
                "status": "success",
                "message": f"Access token generated for {self.workspaces[workspace]}",
                "data": {"access_token": self.issue_access_token(workspace, email_)},
            }
        )


FAKE_ROYALTI_KEY: web.AppKey[FakeRoyalti] = web.AppKey("fake_royalti", FakeRoyalti)
"""Where :attr:`FakeRoyalti.app` keeps a reference to its :class:`FakeRoyalti`."""


async def start_fake(
    fake: FakeRoyalti, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve ``fake`` on a real socket; return the runner (``await runner.cleanup()``) and base URL.

    With ``port=0`` the system picks a free port; the URL names the one actually bound.
    """
    runner = web.AppRunner(fake.app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
    except BaseException:
        await runner.cleanup()
        raise
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{url_host}:{bound_port}"
