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

Nothing here is secret: the signing key is a fixed, public test value.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import hashlib
import itertools
import json
import math
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import jwt
from aiohttp import BodyPartReader, hdrs, web
from aiohttp.typedefs import Handler

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

CHUNK_SIZE = 64 * 1024
DEFAULT_DOWNLOAD_SIZE = 1024 * 1024

_ALGORITHM = "HS256"
_REFRESH_NAME = "refresh_token"
_WORKSPACE: web.RequestKey[str] = web.RequestKey("workspace", str)
_BODY: web.RequestKey[tuple[int, str]] = web.RequestKey("body", tuple)


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


class _Failure(Exception):
    """An error answered in Royalti's envelope."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def response(self) -> web.Response:
        headers = {}
        if self.retry_after is not None:
            headers[hdrs.RETRY_AFTER] = str(max(0, math.ceil(self.retry_after)))
        return web.json_response(
            {
                "success": False,
                "error": {"code": self.code, "message": self.message, "details": []},
            },
            status=self.status,
            headers=headers,
        )


def _status_code(status: int) -> str:
    try:
        return HTTPStatus(status).name
    except ValueError:
        return "ERROR"


def _injected(status: int, retry_after: float | None) -> _Failure:
    return _Failure(status, _status_code(status), "Injected failure", retry_after=retry_after)


def _unauthorized(message: str) -> _Failure:
    return _Failure(401, "UNAUTHORIZED", message)


def _int_param(
    request: web.Request, name: str, default: int, *, low: int, high: int | None = None
) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _Failure(400, "VALIDATION_ERROR", f"{name} must be an integer") from None
    if value < low or (high is not None and value > high):
        raise _Failure(400, "VALIDATION_ERROR", f"{name} is out of range")
    return value


_DSPS = ("Spotify", "Apple Music", "YouTube", "Deezer", "Tidal")
_COUNTRIES = ("NG", "US", "GB", "DE", "BR", "IN", "ZA")
_CSV_HEADER = b"row,isrc,title,artist,dsp,country,period,units,revenue\n"


# Everything after the title repeats with period 420 (= lcm of 5 DSPs, 7 countries, 12 months),
# so it is formatted once; a row then costs three integer conversions.
_CSV_TAILS = tuple(
    f"Artist {i % 97},{_DSPS[i % 5]},{_COUNTRIES[i % 7]},2024-{i % 12 + 1:02d},"
    f"{i * 37 % 1000},{i * 7919 % 100000 / 100:.2f}\n"
    for i in range(420)
)
_CSV_BATCH = 1024


def _csv_lines() -> Iterator[bytes]:
    """The CSV, forever, a batch of rows at a time."""
    yield _CSV_HEADER
    tails = _CSV_TAILS
    for first in itertools.count(1, _CSV_BATCH):
        yield "".join(
            [
                f"{i},QZFAK{i:07d},Track {i},{tails[i % 420]}"
                for i in range(first, first + _CSV_BATCH)
            ]
        ).encode()


def csv_bytes(size: int) -> Iterator[bytes]:
    """Yield exactly ``size`` bytes of deterministic CSV, in chunks of at most 64 KiB.

    A header line, then numbered royalty rows, cut off at ``size`` (mid-row if need be). This is
    exactly what the fake's download endpoints send, so tests can compute the expected digest.
    Memory stays bounded whatever ``size`` is.
    """
    if size < 0:
        raise ValueError("size must not be negative")
    lines = _csv_lines()
    buffer = bytearray()
    remaining = size
    while remaining > 0:
        want = min(CHUNK_SIZE, remaining)
        while len(buffer) < want:
            buffer += next(lines)
        yield bytes(buffer[:want])
        del buffer[:want]
        remaining -= want


async def _drain(request: web.Request) -> tuple[int, str]:
    """Read the rest of the request body in chunks; its length and SHA-256, never all in memory."""
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_chunked(CHUNK_SIZE):
        digest.update(chunk)
        length += len(chunk)
    return length, digest.hexdigest()


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
        token = self._encode(
            {
                "id": self.user_id(email),
                "name": _REFRESH_NAME,
                "iat": iat,
                "exp": iat + int(self.refresh_lifetime),
                "jti": uuid.uuid4().hex,
            }
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
        return self._encode(claims)

    def jwt_wall(self) -> float:
        """The issuer's clock: ``wall`` plus ``jwt_offset``."""
        return self.wall() + self.jwt_offset

    def revoke_refresh_tokens(self) -> None:
        """Revoke every refresh token issued so far: authtoken then answers 401 for them."""
        self.revoked_refresh.update(self._issued_refresh)

    def revoke_access_token(self, token: str) -> None:
        """Revoke one access token: API endpoints then answer 401 for it."""
        self.revoked_access.add(token)

    def _encode(self, claims: dict[str, Any]) -> str:
        with warnings.catch_warnings():
            # PyJWT warns about HMAC keys under 32 bytes; this key is a public test value, and
            # the test suite turns warnings into errors.
            warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
            return jwt.encode(claims, self.secret, algorithm=_ALGORITHM)

    def _decode(self, token: str) -> dict[str, Any]:
        """Check the signature only: expiry is judged on ``self.wall``, not on real time."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    self.secret,
                    algorithms=[_ALGORITHM],
                    options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
                )
            except jwt.InvalidTokenError:
                raise _unauthorized("Invalid token") from None
        return claims

    def _expired(self, claims: Mapping[str, Any]) -> bool:
        exp = claims.get("exp")
        return not isinstance(exp, int | float) or self.jwt_wall() >= exp

    @staticmethod
    def _bearer(request: web.Request) -> str:
        scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _unauthorized("Missing bearer token")
        return value.strip()

    def _authorise(self, request: web.Request) -> str:
        """The workspace an API request acts in, or a 401 failure."""
        token = self._bearer(request)
        if token in self.api_keys:
            return self.api_keys[token]
        claims = self._decode(token)
        workspace = claims.get("activeWorkspace")
        if claims.get("name") == _REFRESH_NAME or not isinstance(workspace, str):
            raise _unauthorized("Not an access token")
        if self._expired(claims):
            self.expired_seen += 1
            raise _unauthorized("Token expired")
        if token in self.revoked_access:
            raise _unauthorized("Token revoked")
        if self.reject_all_access_before is not None:
            issued = self._issued_at.get(str(claims.get("jti")), claims.get("iat"))
            if not isinstance(issued, int | float) or issued < self.reject_all_access_before:
                raise _unauthorized("Token revoked")
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
            router.add_get(path, self._list)
        router.add_route("*", "/echo", self._echo)
        router.add_route("*", "/echo/{tail:.*}", self._echo)
        self._upload_route = router.add_post("/file/royalty", self._upload)
        router.add_get("/file/{id}/download", self._download)
        router.add_get("/{resource}/download/csv", self._download)
        router.add_post("/ai/chat", self._chat)
        router.add_route("*", "/status/{code}", self._status)
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
            await _drain(request)
            self.requests.append(
                RecordedRequest(
                    request.method, request.raw_path, headers, request.content.total_bytes, None
                )
            )
        else:
            body = request[_BODY] = await _drain(request)
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
                request[_WORKSPACE] = self._authorise(request)
            return await handler(request)
        except _Failure as failure:
            return failure.response()
        except web.HTTPException as exc:
            if exc.empty_body:
                raise
            envelope = _Failure(exc.status, _status_code(exc.status), exc.reason).response()
            for name in (hdrs.ALLOW, hdrs.LOCATION):
                if name in exc.headers:
                    envelope.headers[name] = exc.headers[name]
            return envelope

    # -- credential chain -----------------------------------------------------------------------

    async def _login(self, request: web.Request) -> web.StreamResponse:
        self.login_calls += 1
        if self.login_failures:
            raise _injected(*self.login_failures.pop(0))
        now = self.wall()
        # Sliding window over the calls that were let through ("20 requests per 3 minutes").
        while self._login_times and self._login_times[0] <= now - self.login_window:
            self._login_times.popleft()
        if len(self._login_times) >= self.login_limit:
            wait = max(1.0, self._login_times[0] + self.login_window - now)
            raise _Failure(429, "TOO_MANY_REQUESTS", "Too many login attempts", retry_after=wait)
        self._login_times.append(now)
        try:
            body = await request.json()
        except ValueError:
            raise _Failure(400, "VALIDATION_ERROR", "Body must be JSON") from None
        if not isinstance(body, dict):
            raise _Failure(400, "VALIDATION_ERROR", "Body must be a JSON object")
        email_, password = body.get("email"), body.get("password")
        if not isinstance(email_, str) or not isinstance(password, str):
            raise _Failure(400, "VALIDATION_ERROR", "email and password are required")
        if self.users.get(email_) != password:
            raise _Failure(401, "INVALID_CREDENTIALS", "Invalid email or password")
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
            raise _injected(*self.authtoken_failures.pop(0))
        token = self._bearer(request)
        claims = self._decode(token)
        if claims.get("name") != _REFRESH_NAME:
            raise _unauthorized("Not a refresh token")
        if self._expired(claims):
            raise _unauthorized("Refresh token expired")
        if token in self.revoked_refresh:
            raise _unauthorized("Refresh token revoked")
        if not workspace:
            raise _Failure(400, "VALIDATION_ERROR", "currentWorkspace is required")
        if workspace not in self.workspaces:
            raise _Failure(404, "NOT_FOUND", "Workspace not found")
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

    # -- API endpoints --------------------------------------------------------------------------

    async def _list(self, request: web.Request) -> web.StreamResponse:
        page = _int_param(request, "page", 1, low=1)
        size = _int_param(request, "size", 10, low=1, high=100)
        kind = request.path.strip("/").replace("/", "-")
        first = (page - 1) * size + 1
        return web.json_response(
            {
                "success": True,
                "workspace": request[_WORKSPACE],
                "page": page,
                "size": size,
                "data": [
                    {"id": f"{kind}-{n}", "name": f"Fake {kind} {n}"}
                    for n in range(first, first + min(size, 3))
                ],
            }
        )

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        body_len, body_sha256 = request[_BODY]
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body_len": body_len,
                "body_sha256": body_sha256,
                "workspace": request[_WORKSPACE],
            }
        )

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        if not request.content_type.startswith("multipart/"):
            raise _Failure(400, "VALIDATION_ERROR", "Expected multipart/form-data")
        files: list[dict[str, Any]] = []
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                raise _Failure(400, "VALIDATION_ERROR", "Nested multipart is not supported")
            digest = hashlib.sha256()
            size = 0
            while chunk := await part.read_chunk(CHUNK_SIZE):
                digest.update(chunk)
                size += len(chunk)
            files.append(
                {
                    "field": part.name,
                    "filename": part.filename,
                    "size": size,
                    "sha256": digest.hexdigest(),
                }
            )
        return web.json_response({"success": True, "files": files})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        size = _int_param(request, "size", DEFAULT_DOWNLOAD_SIZE, low=0)
        response = web.StreamResponse(
            headers={hdrs.CONTENT_DISPOSITION: 'attachment; filename="export.csv"'}
        )
        response.content_type = "text/csv"
        response.content_length = size
        await response.prepare(request)
        for chunk in csv_bytes(size):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        count = _int_param(request, "n", 5, low=0, high=10_000)
        response = web.StreamResponse(headers={hdrs.CACHE_CONTROL: "no-cache"})
        response.content_type = "text/event-stream"
        await response.prepare(request)
        for index in range(count):
            # With a gate, each event waits for one item: tests prove events arrive one by one
            # without sleeping. The final "done" event is not gated.
            if self.sse_gate is not None:
                await self.sse_gate.get()
            elif index:
                await asyncio.sleep(self.sse_interval)
            data = json.dumps({"index": index, "text": f"Royalty insight number {index}."})
            await response.write(f"id: {index}\ndata: {data}\n\n".encode())
        await response.write(b"event: done\ndata: {}\n\n")
        await response.write_eof()
        return response

    async def _status(self, request: web.Request) -> web.StreamResponse:
        try:
            status = int(request.match_info["code"])
        except ValueError:
            raise _Failure(400, "VALIDATION_ERROR", "status must be an integer") from None
        if not 200 <= status <= 599:
            raise _Failure(400, "VALIDATION_ERROR", "status is out of range")
        headers = {}
        if 300 <= status < 400:
            headers[hdrs.LOCATION] = "https://elsewhere.example/x"
        if status in (204, 304):
            return web.Response(status=status, headers=headers)
        if status >= 400:
            response = _Failure(status, _status_code(status), "Requested status").response()
            response.headers.update(headers)
            return response
        return web.json_response(
            {"success": True, "status": status}, status=status, headers=headers
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
