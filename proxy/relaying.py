"""Relaying the upstream's response to the client: its headers less the hop-by-hop ones, and its
body as it arrives, with a response whose body has already arrived whole leaving in one write.
A body that breaks off aborts the client's connection, so a truncated body never looks whole."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11

from proxy.routing import _NAME_CACHE_SIZE, HOP_BY_HOP, _connection_extra

log = logging.getLogger("proxy.forward")


class _OneWriteResponse(web.StreamResponse):
    """A response whose head waits for its first body bytes, so that both leave in one write
    (one TCP segment, one wake-up of the client) instead of two, as ``web.Response`` does.
    Used when body bytes are already there; a response whose body has not started yet
    sends its head at once (a client waiting on a slow stream sees the status early)."""

    _send_headers_immediately = False


class _WrittenResponse(web.StreamResponse):
    """What the handler returns for a response :func:`_write_whole` has already written to the
    client's transport: aiohttp's server only asks it whether to keep the connection alive, and
    its ``prepare`` and ``write_eof`` have nothing left to do. Built without
    ``StreamResponse.__init__`` (a headers multidict, a dozen fields), which it never uses."""

    def __init__(self, status: int) -> None:
        self._status = status
        self._keep_alive = True
        self._eof_sent = True

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


#: Largest body :func:`_write_whole` writes without flow control (the transport's own buffer).
_WHOLE_MAX = 64 * 1024


def _write_whole(
    request: web.BaseRequest,
    resp: aiohttp.ClientResponse,
    extra: frozenset[str],
    body: bytes,
) -> web.StreamResponse | None:
    """Write a response whose body has arrived whole as one ``transport.write`` of head and body,
    serialised here instead of by ``StreamResponse.prepare`` and ``write_eof`` (their chain of
    coroutines, header multidicts and the payload writer's bookkeeping cost about 8 % of a small
    request: docs/performance.md). The bytes are the ones aiohttp would write: the same status
    line, the same headers in the same order (less the hop-by-hop ones and those ``extra``, the
    ``Connection`` header, names), then ``Content-Type``, ``Date`` and ``Server`` added as
    aiohttp adds them when missing.

    Only for the common case, where that is certain: an HTTP/1.1 keep-alive request that is not
    ``HEAD``, a status that has a body, a ``Content-Length`` equal to the body received, a body
    of at most 64 KiB, and no CR or LF anywhere. None when any of that does not hold: the caller
    then takes aiohttp's own path."""
    transport = request.transport
    status = resp.status
    reason = resp.reason
    headers = resp.headers
    if (
        transport is None
        or transport.is_closing()
        or request.version != HttpVersion11
        or not request.keep_alive
        or request.method == "HEAD"
        or status < 200
        or status in (204, 304)
        or len(body) > _WHOLE_MAX
        or reason is None
        or headers.get("Content-Length") != str(len(body))
    ):
        return None
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    seen = 0
    names = _response_names
    for name, value in headers.items():
        kind = names.get(name)
        if kind is None:
            kind = _classify_response_header(name)
        if kind and not (extra and name.lower() in extra):
            lines.append(f"{name}: {value}\r\n")
            seen |= kind
    if not seen & _CONTENT_TYPE and body:
        lines.append("Content-Type: application/octet-stream\r\n")
    if not seen & _DATE:
        lines.append(f"Date: {rfc822_formatted_time()}\r\n")
    if not seen & _SERVER:
        lines.append(f"Server: {SERVER_SOFTWARE}\r\n")
    lines.append("\r\n")
    head = "".join(lines)
    if head.count("\n") != len(lines) or head.count("\r") != len(lines):
        return None  # a CR or LF inside a name, value or reason: aiohttp's path refuses it
    try:
        data = head.encode()
    except UnicodeEncodeError:
        return None
    transport.write(data + body)
    return _WrittenResponse(status)


#: What :func:`_classify_response_header` says of a name: 0 when it is not passed on, else
#: _KEEP, with a bit more for the headers aiohttp adds when they are missing.
_KEEP, _DATE, _SERVER, _CONTENT_TYPE = 1, 2, 4, 8
_ADDED_WHEN_MISSING = {
    "date": _KEEP | _DATE,
    "server": _KEEP | _SERVER,
    "content-type": _KEEP | _CONTENT_TYPE,
}

#: Response header name (as received) -> :func:`_classify_response_header`'s verdict.
_response_names: dict[str, int] = {}


def _classify_response_header(name: str) -> int:
    low = name.lower()
    kind = 0
    if low not in HOP_BY_HOP and not low.startswith("proxy-"):
        kind = _ADDED_WHEN_MISSING.get(low, _KEEP)
    if len(_response_names) >= _NAME_CACHE_SIZE:
        _response_names.clear()  # bounded: header names are the upstream's to choose
    _response_names[name] = kind
    return kind


async def relay(request: web.BaseRequest, resp: aiohttp.ClientResponse) -> web.StreamResponse:
    content = resp.content
    try:
        first = content.read_nowait()  # what has arrived with the headers, without waiting
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        first = b""  # the loop below meets the same error, and aborts
    complete = content.is_eof()
    headers = resp.headers
    extra: frozenset[str] = frozenset()
    if "Connection" in headers:
        extra = _connection_extra(HOP_BY_HOP, tuple(headers.getall("Connection")))
    if complete:
        written = _write_whole(request, resp, extra, first)
        if written is not None:
            return written
    names = _response_names
    kept: list[tuple[str, str]] = []
    for item in headers.items():
        keep = names.get(item[0])
        if keep is None:
            keep = _classify_response_header(item[0])
        if keep and not (extra and item[0].lower() in extra):
            kept.append(item)
    cls = _OneWriteResponse if first or complete else web.StreamResponse
    out = cls(status=resp.status, reason=resp.reason)
    out.headers.extend(kept)
    await out.prepare(request)
    if complete:
        # The whole body has already arrived (any small response): it leaves with the
        # headers in one write, without the async iterator.
        await out.write_eof(first)
        return out
    try:
        if first:
            await out.write(first)  # with the headers, in one write
        async for chunk in content.iter_any():
            await out.write(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
        # Never let a truncated body look complete: abort the client's connection instead of
        # ending the response normally.
        log.warning(
            "upstream response broke off; aborting the client connection",
            extra={"event": "upstream_aborted", "error": type(exc).__name__},
        )
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError from exc
    await out.write_eof()
    return out
