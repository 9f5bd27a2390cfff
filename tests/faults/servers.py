"""The suite's misbehaving peers, all real servers on 127.0.0.1:0.

* :class:`IssuingFake`: the fake Royalti API, remembering every token it issues (for the leak
  check) and serving on a logger of its own.
* :class:`HostileTokenServer`: Royalti's ``/auth/login`` and ``/auth/authtoken``, healthy or
  misbehaving on command in one of the ways listed in :data:`FAULTS`; the tokens it issues are
  the fake's, so the fake upstream accepts them.
* :class:`RawServer`: a plain TCP server whose every connection is handled by a script of the
  test's own (resets, stalls, malformed framing), recording what it received. As an **evil
  host** it just records: a proxy that is not an open proxy never connects to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import socket
import ssl
import struct
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.clock import settle
from proxy.fakes.royalti import FakeRoyalti

FAKE_LOGGER = "tests.faults.fake"
"""The logger the suite's own servers report their troubles to: they are not the proxy's."""
_fake_log = logging.getLogger(FAKE_LOGGER)


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on a free loopback port; its errors go to the suite's fake logger."""
    runner = web.AppRunner(
        app,
        logger=_fake_log,
        access_log=None,
        handler_cancellation=True,  # a held handler ends when the proxy hangs up
        shutdown_timeout=0.5,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


class IssuingFake(FakeRoyalti):
    """The fake Royalti API, remembering every token it mints."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.issued: list[str] = []

    def issue_refresh_token(self, email: str = "ops@example.com") -> str:
        token = super().issue_refresh_token(email)
        self.issued.append(token)
        return token

    def issue_access_token(self, workspace: str, email: str = "ops@example.com") -> str:
        token = super().issue_access_token(workspace, email)
        self.issued.append(token)
        return token

    def mint(self, claims: dict[str, Any]) -> str:
        """A token signed like the fake's own, with claims of the test's choosing."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
            token = jwt.encode(claims, self.secret, algorithm="HS256")
        self.issued.append(token)
        return token


# -- the hostile token endpoint ----------------------------------------------------------------

YEAR = 365 * 24 * 3600

FAULTS: dict[str, str] = {
    "slow": "TIMEOUT",
    "http_500": "HTTP_500",
    "empty_200": "BAD_RESPONSE",
    "html_200": "BAD_RESPONSE",
    "json_without_token": "BAD_RESPONSE",
    "not_a_jwt": "BAD_TOKEN",
    "exp_in_the_past": "TOKEN_EXPIRED",
    "huge_body": "BODY_TOO_LARGE",
    "http_429": "HTTP_429",
    "connection_reset": "NETWORK",
}
"""Each way the token endpoint misbehaves, and the error code the proxy must report for it."""

RETRY_AFTER = 120
HUGE_LIMIT = 64 * 1024 * 1024
"""The huge body is endless in spirit; the server gives up after this much."""


def _abort(transport: asyncio.BaseTransport | None) -> None:
    """Close a connection with a TCP reset (RST), not an orderly FIN."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class HostileTokenServer:
    """``/auth/login`` and ``/auth/authtoken`` that misbehave on command.

    ``login_fault`` / ``authtoken_fault`` name an entry of :data:`FAULTS` (or ``"exp_years_ahead"``)
    or are None for a healthy answer; ``fault_workspaces``, when set, limits the authtoken fault
    to those workspaces. Healthy answers carry the fake's tokens, so the fake upstream accepts
    them. The ``Date`` header follows the fake's (injected) clock.
    """

    def __init__(self, fake: IssuingFake) -> None:
        self.fake = fake
        self.url = ""
        """Where it listens, once served."""
        self.redirect_to = "http://127.0.0.1:9/"
        """Where the ``redirect`` fault points."""
        self.login_fault: str | None = None
        self.authtoken_fault: str | None = None
        self.fault_workspaces: set[str] | None = None
        self.calls: Counter[str] = Counter()
        """By ``login`` and ``authtoken:<workspace>``."""
        self.huge_bytes_sent = 0
        self._release = asyncio.Event()
        app = web.Application()
        app.on_response_prepare.append(self._date)
        app.router.add_post("/auth/login", self._login)
        app.router.add_get("/auth/authtoken", self._authtoken)
        self.app = app

    def heal(self) -> None:
        self.login_fault = None
        self.authtoken_fault = None
        self._release.set()

    async def _date(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Date"] = email.utils.formatdate(self.fake.wall(), usegmt=True)

    async def _login(self, request: web.Request) -> web.StreamResponse:
        self.calls["login"] += 1
        body = await request.json()
        if self.fake.users.get(body.get("email")) != body.get("password"):
            return web.json_response({"success": False}, status=401)
        if self.login_fault is not None:
            return await self._misbehave(request, self.login_fault, "refresh_token", None)
        return web.json_response(
            {
                "message": "Successful",
                "workspaces": [
                    {"workspaceId": ws, "name": n} for ws, n in self.fake.workspaces.items()
                ],
                "refresh_token": self.fake.issue_refresh_token(body["email"]),
            }
        )

    async def _authtoken(self, request: web.Request) -> web.StreamResponse:
        workspace = request.query.get("currentWorkspace", "")
        self.calls[f"authtoken:{workspace}"] += 1
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if bearer not in self.fake.issued or self._expired(bearer):
            return web.json_response({"success": False}, status=401)
        fault = self.authtoken_fault
        if fault is not None and (
            self.fault_workspaces is None or workspace in self.fault_workspaces
        ):
            return await self._misbehave(request, fault, "access_token", workspace)
        return web.json_response(
            {"data": {"access_token": self.fake.issue_access_token(workspace)}}
        )

    def _expired(self, token: str) -> bool:
        claims = jwt.decode(token, options={"verify_signature": False})
        return bool(claims["exp"] <= self.fake.wall())

    def _token(self, kind: str, workspace: str | None, *, iat: float | None, exp: float) -> str:
        claims: dict[str, Any] = {"id": self.fake.user_id("ops@example.com"), "exp": int(exp)}
        if iat is not None:
            claims["iat"] = int(iat)
        if kind == "refresh_token":
            claims["name"] = "refresh_token"
        else:
            claims.update(name="ops@example.com", activeWorkspace=workspace)
        return self.fake.mint(claims)

    def _envelope(self, kind: str, token: str) -> dict[str, Any]:
        return {"refresh_token": token} if kind == "refresh_token" else {"data": {kind: token}}

    async def _misbehave(
        self, request: web.Request, fault: str, kind: str, workspace: str | None
    ) -> web.StreamResponse:
        now = self.fake.wall()
        if fault == "slow":
            await self._release.wait()  # ended early by the proxy hanging up
            return web.json_response({})
        if fault == "http_500":
            return web.json_response({"success": False}, status=500)
        if fault == "empty_200":
            return web.Response(status=200)
        if fault == "html_200":
            return web.Response(text="<html><body>Sign in</body></html>", content_type="text/html")
        if fault == "json_without_token":
            return web.json_response({"status": "success", "data": {"note": "no token here"}})
        if fault == "not_a_jwt":
            return web.json_response(self._envelope(kind, "definitely-not-a-jwt"))
        if fault == "exp_in_the_past":
            token = self._token(kind, workspace, iat=None, exp=now - 3600)
            return web.json_response(self._envelope(kind, token))
        if fault == "exp_in_the_past_with_iat":
            # Issued seven hours ago for six hours: expired an hour ago by the Date header,
            # though exp - iat still reads as a 6 h lifetime. Not in FAULTS since issue 12:
            # it is also what an issuer 7 h behind its front end sends, and is used
            # (tests/faults/test_clock_skew_faults.py).
            token = self._token(kind, workspace, iat=now - 7 * 3600, exp=now - 3600)
            return web.json_response(self._envelope(kind, token))
        if fault == "exp_years_ahead":
            token = self._token(kind, workspace, iat=now, exp=now + 10 * YEAR)
            return web.json_response(self._envelope(kind, token))
        if fault == "huge_body":
            return await self._huge(request, kind, workspace)
        if fault == "http_429":
            return web.json_response(
                {"success": False}, status=429, headers={"Retry-After": str(RETRY_AFTER)}
            )
        if fault == "connection_reset":
            return await self._reset(request, kind)
        if fault == "split_body":
            return await self._split(request, kind, workspace)
        if fault == "redirect":
            # 307 keeps the method and body: a client that followed it would send the password.
            return web.Response(status=307, headers={"Location": self.redirect_to + request.path})
        raise AssertionError(f"unknown fault {fault}")

    async def _huge(
        self, request: web.Request, kind: str, workspace: str | None
    ) -> web.StreamResponse:
        """A JSON document that starts well and never ends (in practice: 64 MiB)."""
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(json.dumps(self._envelope(kind, "x"))[:-1].encode() + b', "pad": "')
        chunk = b"x" * 65536
        try:
            while self.huge_bytes_sent < HUGE_LIMIT:
                await response.write(chunk)
                self.huge_bytes_sent += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the reader hung up: exactly what a bounded read does
        return response

    async def _split(
        self, request: web.Request, kind: str, workspace: str | None
    ) -> web.StreamResponse:
        """A healthy answer, written in two pieces with the event loop run in between (as when
        it arrives in two TCP segments)."""
        if kind == "refresh_token":
            doc: dict[str, Any] = {
                "workspaces": [
                    {"workspaceId": ws, "name": n} for ws, n in self.fake.workspaces.items()
                ],
                "refresh_token": self.fake.issue_refresh_token(),
            }
        else:
            doc = {"data": {"access_token": self.fake.issue_access_token(workspace or "")}}
        data = json.dumps(doc).encode()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[:40])
        await settle()
        await response.write(data[40:])
        await response.write_eof()
        return response

    async def _reset(self, request: web.Request, kind: str) -> web.StreamResponse:
        """Headers promising 4 KiB, half a JSON document, then a TCP reset."""
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 4096
        await response.prepare(request)
        await response.write(b'{"' + kind.encode() + b'": "eyJhbGciOiJIUzI1NiJ9.')
        await asyncio.sleep(0)
        _abort(request.transport)
        return response


# -- raw TCP peers -----------------------------------------------------------------------------


@dataclass
class RawRequest:
    """One request as a raw server read it."""

    line: bytes
    headers: CIMultiDict[str]
    body: bytes
    trailers: list[bytes] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.line.split(b" ", 1)[0].decode()


async def read_head(reader: asyncio.StreamReader) -> tuple[bytes, CIMultiDict[str]]:
    line = await reader.readline()
    headers: CIMultiDict[str] = CIMultiDict()
    while (raw := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = raw.decode("latin-1").partition(":")
        headers.add(name.strip(), value.strip())
    return line.rstrip(b"\r\n"), headers


async def read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, list[bytes]]:
    body = bytearray()
    while size := int((await reader.readline()).split(b";")[0], 16):
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"
    trailers = []
    while (raw := await reader.readline()) not in (b"\r\n", b""):
        trailers.append(raw.rstrip(b"\r\n"))
    return bytes(body), trailers


async def read_request(reader: asyncio.StreamReader) -> RawRequest:
    line, headers = await read_head(reader)
    if not line:
        raise ConnectionResetError("the peer closed the connection")
    trailers: list[bytes] = []
    if "Content-Length" in headers:
        body = await reader.readexactly(int(headers["Content-Length"]))
    elif headers.get("Transfer-Encoding", "").lower() == "chunked":
        body, trailers = await read_chunked(reader)
    else:
        body = b""
    return RawRequest(line, headers, body, trailers)


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "RawServer"], Awaitable[None]]


class RawServer:
    """A TCP server whose connections are handled by ``script``; it records what arrives.

    ``connections`` counts accepted connections, ``received`` holds every byte read through
    :meth:`recv`-style helpers, ``requests`` every request parsed with :meth:`next_request`.
    With ``tls`` it speaks TLS, and its ``url`` is ``https://``.
    """

    def __init__(self, script: Script | None = None, *, tls: ssl.SSLContext | None = None) -> None:
        self._script = script or _record_everything
        self._tls = tls
        self.connections = 0
        self.received = bytearray()
        self.requests: list[RawRequest] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._script(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Cancelled by __aexit__ only. Ending normally keeps asyncio's stream callback from
            # logging the cancellation as an error that would look like the proxy's.
            pass
        finally:
            self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()

    async def next_request(self, reader: asyncio.StreamReader) -> RawRequest:
        request = await read_request(reader)
        self.requests.append(request)
        self.received += request.line + b"\r\n"
        for name, value in request.headers.items():
            self.received += f"{name}: {value}\r\n".encode("latin-1")
        self.received += request.body
        return request


async def _record_everything(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RawServer
) -> None:
    """The evil host: keep every byte, and answer so that a leaked token would be used."""
    while data := await reader.read(65536):
        server.received += data
        if b"\r\n\r\n" in data:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!")
            await writer.drain()


def abort_with_reset(writer: asyncio.StreamWriter) -> None:
    _abort(writer.transport)


# -- a raw client ------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    trailers: list[bytes] = field(default_factory=list)


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> RawResponse:
    """One response, framed by its headers (RFC 9112 §6.3); ``head`` for a HEAD request."""
    line, headers = await read_head(reader)
    status = int(line.split()[1])
    trailers: list[bytes] = []
    if head or status in (204, 304) or 100 <= status < 200:
        body = b""
    elif headers.get("Transfer-Encoding", "").lower() == "chunked":
        body, trailers = await read_chunked(reader)
    elif "Content-Length" in headers:
        body = await reader.readexactly(int(headers["Content-Length"]))
    else:
        body = await reader.read()
    return RawResponse(status, headers, body, trailers)


async def open_raw(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = URL(base)
    assert url.host is not None and url.port is not None
    return await asyncio.open_connection(url.host, url.port)


async def raw_exchange(base: str, request: bytes, *, timeout: float = 5.0) -> RawResponse:
    """Send bytes exactly as written and read one response (bounded in time)."""
    reader, writer = await open_raw(base)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), timeout)
    finally:
        await close_quietly(writer)


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
