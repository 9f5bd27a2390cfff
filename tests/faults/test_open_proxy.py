"""The proxy is not an open proxy: whatever a client writes, only the configured upstream (and
the token endpoint) is ever contacted, and the token never travels anywhere else.

An **evil host** (a real server on another port that records every connection and every byte)
is named in every way a request can name a host: absolute-form targets, ``CONNECT``, paths that
look like authorities, the ``Host`` header, redirects from the upstream and from the token
endpoint. It must see no connection at all.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.app import Proxy
from proxy.errors import ERROR_HEADER
from tests.conftest import WS, ProxyFactory, royalti_config
from tests.faults.conftest import LeakCheck
from tests.faults.servers import (
    HostileTokenServer,
    IssuingFake,
    RawServer,
    raw_exchange,
    serve_app,
)

EVIL = "{evil}"
"""Stands for the evil host's ``127.0.0.1:<port>`` in the parametrised requests."""


@pytest.fixture
async def evil(leak_check: LeakCheck) -> AsyncIterator[RawServer]:
    """The evil host. Whatever the test did, it must end with no connection to it."""
    async with RawServer() as server:
        leak_check.place("evil host", lambda: bytes(server.received))
        yield server
    assert server.connections == 0, bytes(server.received)


@pytest.fixture
async def proxy(start_proxy: ProxyFactory, fake_api_url: str) -> Proxy:
    return await start_proxy(royalti_config(fake_api_url, default_workspace=WS[0]))


def request_bytes(line: str, evil: RawServer, *headers: str) -> bytes:
    host = f"127.0.0.1:{evil.port}"
    lines = [line.replace(EVIL, host), *(h.replace(EVIL, host) for h in headers)]
    return ("\r\n".join([*lines, "Connection: close", "", ""])).encode()


@pytest.mark.parametrize(
    "line",
    [
        f"GET http://{EVIL}/x HTTP/1.1",
        f"POST http://{EVIL}/auth/login HTTP/1.1",
        f"GET https://{EVIL}/x HTTP/1.1",
        f"CONNECT {EVIL} HTTP/1.1",
        "OPTIONS * HTTP/1.1",
        "GET /..%2f..%2fx HTTP/1.1",
        "GET /user/%2e%2e/%2E%2E/x HTTP/1.1",
    ],
    ids=[
        "absolute-form",
        "absolute-form-post",
        "absolute-https",
        "connect",
        "asterisk",
        "dots-2f",
        "dots-2e",
    ],
)
@pytest.mark.parametrize("host", [f"Host: {EVIL}", "Host: p"], ids=["evil-host", "own-host"])
async def test_a_target_that_is_not_origin_form_is_refused_and_no_host_is_contacted(
    line: str,
    host: str,
    proxy: Proxy,
    evil: RawServer,
    issuing_fake: IssuingFake,
    leak_check: LeakCheck,
) -> None:
    response = await raw_exchange(
        proxy.addresses["proxy"], request_bytes(line, evil, host, "Content-Length: 0")
    )
    leak_check.place("400 body", response.body)
    assert response.status == 400
    assert response.headers[ERROR_HEADER] == "INVALID_REQUEST_TARGET"
    assert json.loads(response.body)["error"]["code"] == "INVALID_REQUEST_TARGET"
    assert issuing_fake.api_calls == 0


@pytest.mark.parametrize(
    "path",
    [
        f"//{EVIL}/x",
        f"/@{EVIL}/x",
        f"/%2F%2F{EVIL}/x",
        f"/http://{EVIL}/x",
        f"/user/?next=http://{EVIL}/",
    ],
    ids=["double-slash", "at-sign", "encoded-slashes", "url-in-path", "url-in-query"],
)
async def test_a_path_that_looks_like_an_authority_goes_to_the_upstream_as_a_path(
    path: str, proxy: Proxy, evil: RawServer, issuing_fake: IssuingFake, leak_check: LeakCheck
) -> None:
    sent = path.replace(EVIL, f"127.0.0.1:{evil.port}")
    response = await raw_exchange(
        proxy.addresses["proxy"], request_bytes(f"GET {path} HTTP/1.1", evil, f"Host: {EVIL}")
    )
    assert response.status != 500
    assert [r.raw_path for r in issuing_fake.requests] == [sent]


async def test_any_host_header_is_ignored_for_routing_and_replaced_upstream(
    proxy: Proxy,
    evil: RawServer,
    issuing_fake: IssuingFake,
    fake_api_url: str,
    leak_check: LeakCheck,
) -> None:
    response = await raw_exchange(
        proxy.addresses["proxy"],
        request_bytes("GET /echo HTTP/1.1", evil, f"Host: {EVIL}", f"X-Forwarded-Host: {EVIL}"),
    )
    assert response.status == 200
    headers = {k.lower(): v for k, v in json.loads(response.body)["headers"]}
    assert headers["host"] == URL(fake_api_url).raw_authority
    assert headers["x-forwarded-host"] == f"127.0.0.1:{evil.port}"  # told, not used


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_from_the_upstream_to_another_host_goes_back_to_the_client(
    status: int,
    start_proxy: ProxyFactory,
    evil: RawServer,
    http: aiohttp.ClientSession,
    leak_check: LeakCheck,
) -> None:
    token = "static-credential-for-redirects-91c2"
    leak_check.secret(token)

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": f"{evil.url}/steal"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    runner, url = await serve_app(app)
    try:
        proxy = await start_proxy(
            {
                "listen": "127.0.0.1:0",
                "admin": {"listen": "127.0.0.1:0"},
                "upstreams": [
                    {"name": "own", "url": url, "auth": {"type": "static", "token": token}}
                ],
            }
        )
        async with http.post(
            proxy.addresses["proxy"] + "/go", data=b"body", allow_redirects=False
        ) as resp:
            assert resp.status == status
            assert resp.headers["Location"] == f"{evil.url}/steal"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("endpoint", ["login", "authtoken"])
async def test_a_redirect_from_the_token_endpoint_is_not_followed(
    endpoint: str,
    start_proxy: ProxyFactory,
    evil: RawServer,
    hostile: HostileTokenServer,
    fake_api_url: str,
    http: aiohttp.ClientSession,
    leak_check: LeakCheck,
) -> None:
    hostile.redirect_to = evil.url
    if endpoint == "login":
        hostile.login_fault = "redirect"
    else:
        hostile.authtoken_fault = "redirect"
    data = royalti_config(fake_api_url, auth_url=hostile.url)
    proxy = await start_proxy(data)
    async with http.get(
        proxy.addresses["proxy"] + "/user/", headers={"X-Royalti-Workspace": WS[0]}
    ) as resp:
        body = await resp.read()
    leak_check.place("503 body", body)
    assert resp.status == 503
    assert resp.headers[ERROR_HEADER] == "TOKEN_UNAVAILABLE"
    assert json.loads(body)["error"]["details"] == ["last error: HTTP_307"]


async def test_the_evil_host_is_reachable_so_silence_from_it_means_something(
    evil: RawServer, http: aiohttp.ClientSession
) -> None:
    """The check itself: a direct request is seen (then forgotten, for the fixture's sake)."""
    async with http.get(f"{evil.url}/probe") as resp:
        assert await resp.read() == b"evil!"
    assert evil.connections == 1
    assert b"GET /probe" in evil.received
    evil.connections = 0
    evil.received.clear()


async def test_an_absolute_form_request_through_a_client_configured_to_use_a_proxy_is_refused(
    proxy: Proxy,
    evil: RawServer,
    issuing_fake: IssuingFake,
    http: aiohttp.ClientSession,
    leak_check: LeakCheck,
) -> None:
    """A client library pointed at the sidecar as its HTTP proxy (``HTTP_PROXY``) sends
    absolute-form targets; the sidecar must refuse rather than become that proxy."""
    async with http.get(f"{evil.url}/x", proxy=proxy.addresses["proxy"]) as resp:
        body = await resp.read()
    leak_check.place("400 body", body)
    assert resp.status == 400
    assert resp.headers[ERROR_HEADER] == "INVALID_REQUEST_TARGET"
    assert issuing_fake.api_calls == 0
