"""Relaying the upstream's response to the client: its headers less the hop-by-hop ones, and its
body as it arrives, with a response whose body has already arrived whole leaving in one write.
A body that breaks off aborts the client's connection, so a truncated body never looks whole."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from proxy.routing import _NAME_CACHE_SIZE, HOP_BY_HOP, _connection_extra

log = logging.getLogger("proxy.forward")


class _OneWriteResponse(web.StreamResponse):
    """A response whose head waits for its first body bytes, so that both leave in one write
    (one TCP segment, one wake-up of the client) instead of two, as ``web.Response`` does.
    Used when body bytes are already there; a response whose body has not started yet
    sends its head at once (a client waiting on a slow stream sees the status early)."""

    _send_headers_immediately = False


#: Response header name (as received) -> whether it is passed on to the client.
_response_names: dict[str, bool] = {}


def _passes_response_header(name: str) -> bool:
    low = name.lower()
    keep = low not in HOP_BY_HOP and not low.startswith("proxy-")
    if len(_response_names) >= _NAME_CACHE_SIZE:
        _response_names.clear()  # bounded: header names are the upstream's to choose
    _response_names[name] = keep
    return keep


async def relay(request: web.BaseRequest, resp: aiohttp.ClientResponse) -> web.StreamResponse:
    content = resp.content
    try:
        first = content.read_nowait()  # what has arrived with the headers, without waiting
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        first = b""  # the loop below meets the same error, and aborts
    complete = content.is_eof()
    cls = _OneWriteResponse if first or complete else web.StreamResponse
    out = cls(status=resp.status, reason=resp.reason)
    headers = resp.headers
    extra: frozenset[str] = frozenset()
    if "Connection" in headers:
        extra = _connection_extra(HOP_BY_HOP, tuple(headers.getall("Connection")))
    names = _response_names
    kept = []
    for item in headers.items():
        keep = names.get(item[0])
        if keep is None:
            keep = _passes_response_header(item[0])
        if keep and not (extra and item[0].lower() in extra):
            kept.append(item)
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
