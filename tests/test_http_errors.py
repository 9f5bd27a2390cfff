"""Answers the HTTP layer gives by itself: every request aiohttp's parser refuses, and a
handler that fails, get the proxy's JSON envelope, ``X-Royalti-Proxy-Error``, an HTTP/1.1
status line and ``Connection: close``; sent and read over raw sockets."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from aiohttp import web

from proxy.inbound import GuardedServer
from tests import test_inbound
from tests.test_inbound import config

upstream = test_inbound.upstream  # the same recording upstream fixture

SECRET = "sidecar-secret-value"

# Each is refused by aiohttp's parser before the proxy's handler sees it.
REFUSED = {
    "oversized header": b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 3000 + b"\r\n\r\n",
    "too many headers": b"GET /x HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(40))
    + b"\r\n",
    "content-length and transfer-encoding": b"POST /x HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad chunk size": b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nhello\r\n0\r\n\r\n",
    "chunk without its CRLF": b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhelloXX0\r\n\r\n",
    "bad request line": b"GARBAGE\r\n\r\n",
    "bad version": b"GET /x HTTP/9.9\r\nHost: x\r\n\r\n",
    "oversized request line": b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "header name with a space": b"GET /x HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
    "TLS on the plain port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
    "HTTP/1.0 with an oversized header": b"GET /x HTTP/1.0\r\nX-Big: " + b"v" * 3000 + b"\r\n\r\n",
}


async def _exchange(address: str, data: bytes) -> tuple[str, dict[str, str], bytes]:
    host, port = address.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    raw = await asyncio.wait_for(reader.read(), timeout=5)  # read to EOF: the proxy closes
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status_line, {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize("data", REFUSED.values(), ids=REFUSED.keys())
async def test_a_request_the_parser_refuses_is_answered_in_the_envelope_over_http_1_1(
    data, upstream, start_proxy, caplog
):
    proxy = await start_proxy(
        config(upstream["url"], limits={"max_header_size": 1024, "max_headers": 20})
    )
    with caplog.at_level("DEBUG"):
        status_line, headers, body = await _exchange(proxy.addresses["proxy"], data)
    assert status_line == "HTTP/1.1 400 Bad Request"
    assert headers["x-royalti-proxy-error"] == "MALFORMED_REQUEST"
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)
    assert error["success"] is False
    assert error["error"]["code"] == "MALFORMED_REQUEST"
    assert error["error"]["message"].startswith("malformed request: ")
    assert upstream["seen"] == []
    (line,) = [r for r in caplog.records if getattr(r, "event", None) == "bad_request"]
    assert (line.levelname, line.status, line.exc_info) == ("INFO", 400, None)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_the_answer_and_the_log_line_do_not_quote_the_request_bytes(
    upstream, start_proxy, caplog
):
    # aiohttp's message for an oversized header quotes its value: here the inbound secret.
    proxy = await start_proxy(
        config(upstream["url"], limits={"max_header_size": 1024}, inbound={"shared_secret": SECRET})
    )
    data = b"GET /x HTTP/1.1\r\nHost: x\r\nX-Proxy-Secret: " + SECRET.encode() * 100 + b"\r\n\r\n"
    with caplog.at_level("DEBUG"):
        status_line, _, body = await _exchange(proxy.addresses["proxy"], data)
    assert status_line == "HTTP/1.1 400 Bad Request"
    assert SECRET not in body.decode()
    assert json.loads(body)["error"]["message"] == (
        "malformed request: Got more than 1024 bytes when reading"
    )
    assert not [r for r in caplog.records if SECRET in str(r.__dict__)]


async def test_refusals_after_the_first_are_debug_lines_until_a_minute_has_passed(
    upstream, start_proxy, caplog
):
    proxy = await start_proxy(config(upstream["url"]))
    with caplog.at_level("DEBUG"):
        for _ in range(50):
            status_line, _, _ = await _exchange(proxy.addresses["proxy"], b"GARBAGE\r\n\r\n")
            assert status_line == "HTTP/1.1 400 Bad Request"
    lines = [r for r in caplog.records if getattr(r, "event", None) == "bad_request"]
    assert [r.levelname for r in lines] == ["INFO"] + ["DEBUG"] * 49


@pytest.mark.parametrize(
    ("raised", "status_line"),
    [
        (RuntimeError("a bug"), "HTTP/1.1 500 Internal Server Error"),
        (TimeoutError(), "HTTP/1.1 504 Gateway Timeout"),
    ],
)
async def test_a_handler_that_raises_is_answered_internal_error_in_the_envelope(
    raised, status_line, caplog
):
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        raise raised

    runner = web.ServerRunner(GuardedServer(handler, header_timeout=5.0, access_log=None))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        got_line, headers, body = await _exchange(
            f"http://{host}:{port}", b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    finally:
        await runner.cleanup()
    assert got_line == status_line
    assert headers["x-royalti-proxy-error"] == "INTERNAL_ERROR"
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "INTERNAL_ERROR"
    if isinstance(raised, RuntimeError):  # a bug is an ERROR with its traceback
        (record,) = [r for r in caplog.records if r.exc_info]
        assert record.levelno == logging.ERROR and record.exc_info[1] is raised
