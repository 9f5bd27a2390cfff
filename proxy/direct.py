"""A leaner way to send a request with aiohttp's client, for the proxy's hot path.

``ClientSession.request`` does much that a forwarding proxy never asks for: URL and credential
checks, cookie filtering, a timeout handle, traces, middlewares, redirects and a context
manager, about 12 us of CPU per request (docs/performance.md). :func:`send_directly` does only
what remains for the proxy's sessions: a connection from the session's connector (the pool,
TLS, ``timeouts.connect``), the response parameters (``timeouts.read``, aiohttp's header
limits), send, read the head, and aiohttp's own single retry of an idempotent request whose
pooled connection failed. It reads private attributes of the session; :func:`can_send_directly`
checks, once per session, that they are there and that the session uses nothing the direct
path leaves out, and tests/test_aiohttp_internals.py checks aiohttp still has them. Any other
session (an egress proxy, for one) takes ``ClientSession.request``.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import aiohttp
from aiohttp.client import IDEMPOTENT_METHODS
from aiohttp.client_exceptions import ConnectionTimeoutError
from aiohttp.helpers import EMPTY_BODY_METHODS, TimerNoop
from aiohttp.tracing import Trace
from multidict import CIMultiDict
from yarl import URL


def can_send_directly(session: aiohttp.ClientSession, timeout: aiohttp.ClientTimeout) -> bool:
    """Whether :func:`send_directly` sends exactly what ``session.request`` would for the proxy: a
    session with nothing that ``ClientSession._request`` does beyond connecting, sending and
    reading the head (no egress proxy, trace, middleware, cookie, default header or
    credential, no overall deadline, no status check), and the private attributes the direct
    path reads where it expects them (tests/test_aiohttp_internals.py checks aiohttp still
    has them). Decided once, when a route is built; False takes aiohttp's own path."""
    try:
        return (
            isinstance(session._cookie_jar, aiohttp.DummyCookieJar)
            and session._default_proxy is None
            and not session._trace_configs
            and not session._middlewares
            and not session._default_headers
            and session._default_auth is None
            and not session._trust_env
            and not session._raise_for_status
            and session._base_url is None
            and session._connector is not None
            and hasattr(session._connector, "_timeout_ceil_threshold")
            and session._request_class is not aiohttp.ClientRequest
            and timeout.total is None
            and all(
                hasattr(session, name)
                for name in (
                    "_loop",
                    "_response_class",
                    "_version",
                    "_auto_decompress",
                    "_read_bufsize",
                    "_max_line_size",
                    "_max_field_size",
                    "_max_headers",
                    "_retry_connection",
                )
            )
        )
    except AttributeError:
        return False


#: aiohttp's timer for a request without an overall deadline (a no-op context manager).
_NO_TIMER = TimerNoop()
#: No trace configuration (can_send_directly): the connector only iterates over it.
_NO_TRACES: list[Trace] = []


async def send_directly(
    session: aiohttp.ClientSession,
    timeout: aiohttp.ClientTimeout,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    data: bytes | io.BytesIO | AsyncIterator[bytes] | None,
) -> aiohttp.ClientResponse:
    """What ``session.request(method, url, headers=..., data=..., allow_redirects=False,
    timeout=timeout)`` does for a session :func:`can_send_directly` accepted, without the
    rest of ``ClientSession._request`` (URL and credential checks, cookie filtering, a timeout
    handle, traces, middlewares, redirects, the request context manager): take a connection
    from the session's connector (pooled, TLS, ``timeouts.connect``), set the response
    parameters (``timeouts.read``, aiohttp's header limits), send, read the head. About 12 us
    less CPU per request (docs/performance.md). aiohttp's own single retry of an idempotent
    request whose pooled connection failed is kept, as ``_request`` does it."""
    if session.closed:
        raise RuntimeError("Session is closed")
    connector = session._connector
    assert connector is not None  # an open session has one
    body: object = data  # after a failed first attempt, aiohttp's payload of it
    method = method.upper()
    retry = session._retry_connection and method in IDEMPOTENT_METHODS
    req: aiohttp.ClientRequest | None = None
    try:
        while True:
            req = session._request_class(
                method,
                url,
                headers=headers,
                data=body,
                version=session._version,
                loop=session._loop,
                response_class=session._response_class,
                timer=_NO_TIMER,
                session=session,
            )
            try:
                return await _attempt(session, connector, req, timeout)
            except _NEVER_RETRIED:
                raise
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                if not retry:
                    raise
                retry = False
                if body is not None:
                    # As aiohttp: the payload rewinds itself once the cancelled writer settled.
                    await req.close()
                    if req._body is not None and req._body.consumed:
                        raise
                    body = req._body
            except aiohttp.ClientError:
                raise
            except OSError as exc:
                if exc.errno is None and isinstance(exc, TimeoutError):
                    raise
                raise aiohttp.ClientOSError(*exc.args) from exc
    finally:
        # The last attempt's payload (a retry sends the same one), as _request closes it.
        if req is not None and req._body is not None:
            await req._body.close()


#: Errors aiohttp never retries, though some of them are ``ClientOSError``s.
_NEVER_RETRIED = (
    ConnectionTimeoutError,
    aiohttp.ClientConnectorError,
    aiohttp.ClientConnectorCertificateError,
    aiohttp.ClientConnectorSSLError,
)


async def _attempt(
    session: aiohttp.ClientSession,
    connector: aiohttp.BaseConnector,
    req: aiohttp.ClientRequest,
    timeout: aiohttp.ClientTimeout,
) -> aiohttp.ClientResponse:
    """One try: a connection, the response parameters, the request sent, the head read."""
    try:
        conn = await connector.connect(req, traces=_NO_TRACES, timeout=timeout)
    except TimeoutError as exc:
        raise ConnectionTimeoutError(f"Connection timeout to host {req.url}") from exc
    assert conn.protocol is not None
    conn.protocol.set_response_params(
        timer=_NO_TIMER,
        skip_payload=req.method in EMPTY_BODY_METHODS,
        read_until_eof=True,
        auto_decompress=session._auto_decompress,
        read_timeout=timeout.sock_read,
        read_bufsize=session._read_bufsize,
        timeout_ceil_threshold=connector._timeout_ceil_threshold,
        max_line_size=session._max_line_size,
        max_field_size=session._max_field_size,
        max_headers=session._max_headers,
    )
    try:
        resp = await req.send(conn)
        try:
            await resp.start(conn)
        except BaseException:
            resp.close()
            raise
    except BaseException:
        conn.close()
        raise
    return resp
