"""The one place where token endpoints are called: bounded reads, and aiohttp's exceptions
translated into :class:`~proxy.errors.TokenFetchError` at this single boundary."""

from __future__ import annotations

import asyncio
import email.utils
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from proxy.errors import TokenFetchError

#: Token responses are small; a larger body is a broken or hostile endpoint.
MAX_TOKEN_BODY = 1024 * 1024
#: The longest ``Retry-After`` honoured. Royalti's login limit is a 3-minute window; an answer
#: asking for a day (a misconfigured limiter, or an HTTP-date from a clock other than the one
#: behind ``Date``) must not stop the proxy from asking for a day.
MAX_RETRY_AFTER = 3600.0


@dataclass(frozen=True, slots=True)
class JsonResponse:
    status: int
    body: Any
    """The decoded JSON body, or None when the body was empty or not JSON."""
    headers: CIMultiDictProxy[str]
    server_time: float | None
    """The server's clock from its ``Date`` header, when it sent one."""

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("Retry-After"), self.server_time)


def parse_retry_after(value: str | None, server_time: float | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP-date
    (RFC 9110 §10.2.3). An HTTP-date is compared with the server's own ``Date`` so that our
    clock's skew does not matter. Never more than :data:`MAX_RETRY_AFTER`."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if server_time is None:
        return None
    return min(max(0.0, when - server_time), MAX_RETRY_AFTER)


def _server_time(headers: Mapping[str, str]) -> float | None:
    date = headers.get("Date")
    if not date:
        return None
    try:
        return email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


async def call_token_endpoint(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    json_body: Any = None,
    form: Mapping[str, str] | None = None,
    timeout: float,
    ssl_context: ssl.SSLContext | bool | None = None,
    max_body: int = MAX_TOKEN_BODY,
) -> JsonResponse:
    """Send one request to a token endpoint and return its status and decoded JSON body.

    Raises :class:`TokenFetchError` with code ``TIMEOUT``, ``TLS_ERROR``, ``NETWORK``,
    ``EGRESS_PROXY`` (the session's egress proxy is unreachable or refused) or
    ``BODY_TOO_LARGE``; never an aiohttp exception. Redirects are not followed: a token
    endpoint that redirects would carry our credentials to another host.
    """
    try:
        async with asyncio.timeout(timeout):
            async with session.request(
                method,
                url,
                headers=headers,
                params=params,
                json=json_body,
                data=form,
                allow_redirects=False,
                ssl=ssl_context if ssl_context is not None else True,
            ) as resp:
                if resp.status == 407:
                    # Only a proxy answers 407 (RFC 9110 §15.5.8): the egress proxy, for a
                    # plain-HTTP endpoint (for HTTPS its refusal of CONNECT raises below).
                    raise TokenFetchError(
                        "EGRESS_PROXY", "the egress proxy refused the request (407)"
                    )
                raw = await _read_bounded(resp, max_body)
                server_time = _server_time(resp.headers)
                body: Any = None
                if raw.strip():
                    try:
                        body = json.loads(raw)
                    except (ValueError, UnicodeDecodeError):
                        body = None
                return JsonResponse(resp.status, body, resp.headers, server_time)
    except TimeoutError as exc:
        raise TokenFetchError(
            "TIMEOUT", f"token endpoint did not answer within {timeout}s"
        ) from exc
    except aiohttp.ClientProxyConnectionError as exc:
        raise TokenFetchError(
            "EGRESS_PROXY", f"the egress proxy could not be reached ({type(exc).__name__})"
        ) from exc
    except aiohttp.ClientHttpProxyError as exc:
        raise TokenFetchError(
            "EGRESS_PROXY", f"the egress proxy refused the CONNECT ({exc.status})"
        ) from exc
    except aiohttp.ClientConnectorCertificateError as exc:
        raise TokenFetchError("TLS_ERROR", "token endpoint certificate did not verify") from exc
    except aiohttp.ClientSSLError as exc:
        raise TokenFetchError("TLS_ERROR", "TLS handshake with token endpoint failed") from exc
    except aiohttp.ClientError as exc:
        raise TokenFetchError(
            "NETWORK", f"token endpoint unreachable ({type(exc).__name__})"
        ) from exc


async def _read_bounded(resp: aiohttp.ClientResponse, max_body: int) -> bytes:
    """The whole body, however many segments it arrives in, but never more than ``max_body``
    bytes in memory. (``StreamReader.read(n)`` returns what is buffered, not up to ``n``.)"""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await resp.content.read(max_body + 1 - size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > max_body:
            raise TokenFetchError(
                "BODY_TOO_LARGE", f"token endpoint sent more than {max_body} bytes"
            )


def status_error(resp: JsonResponse, what: str) -> TokenFetchError:
    """The error for a non-success status that a source has no special meaning for."""
    from proxy.errors import RateLimited

    if resp.status == 429:
        return RateLimited("HTTP_429", f"{what} rate limited", retry_after=resp.retry_after)
    return TokenFetchError(
        f"HTTP_{resp.status}", f"{what} answered {resp.status}", retry_after=resp.retry_after
    )
