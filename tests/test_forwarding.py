"""The proxy forwards requests faithfully, picks the workspace, injects the credential, answers
its own errors in Royalti's envelope and replays once on 401: all through the real proxy on a real
socket, in front of the fake Royalti API (or a tiny upstream of the test's own)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.app import Proxy
from proxy.errors import ERROR_HEADER
from proxy.fakes.royalti import FakeRoyalti
from tests.conftest import PASSWORD, WS, ProxyFactory, Serve, free_port, royalti_config

STATIC_TOKEN = "t0k3n"


# -- helpers ----------------------------------------------------------------------------------


def static_config(url: str, **upstream: Any) -> dict[str, Any]:
    """One upstream with a static bearer token."""
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "upstreams": [
            {
                "name": "own",
                "url": url,
                "auth": {"type": "static", "token": STATIC_TOKEN},
                **upstream,
            }
        ],
    }


def with_workspace(url: str, **auth: Any) -> dict[str, Any]:
    return royalti_config(url, default_workspace=WS[0], **auth)


def target(proxy: Proxy, path: str) -> URL:
    """A proxy URL taken as sent: no client-side normalisation of the path or query."""
    return URL(proxy.addresses["proxy"] + path, encoded=True)


async def echo(
    http: aiohttp.ClientSession,
    proxy: Proxy,
    path: str,
    *,
    method: str = "GET",
    headers: Any = None,
    data: Any = None,
) -> dict[str, Any]:
    async with http.request(method, target(proxy, path), headers=headers, data=data) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


def header_names(echoed: dict[str, Any]) -> list[str]:
    return [name.lower() for name, _ in echoed["headers"]]


def header(echoed: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echoed["headers"] if k.lower() == name.lower()]


def assert_proxy_error(
    status: int, headers: Any, body: bytes, expected: int, code: str, secrets: list[str]
) -> None:
    """The proxy's own error: Royalti's envelope, the code in a header, no secret anywhere."""
    assert status == expected
    assert headers[ERROR_HEADER] == code
    assert headers["Content-Type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["success"] is False
    assert set(doc["error"]) == {"code", "message", "details"}
    assert doc["error"]["code"] == code
    assert doc["error"]["message"]
    assert isinstance(doc["error"]["details"], list)
    text = body.decode()
    assert "eyJ" not in text  # no JWT (refresh or access token) at all
    for secret in secrets:
        assert secret not in text


def secrets_of(fake: FakeRoyalti) -> list[str]:
    return [PASSWORD, STATIC_TOKEN] + [t.removeprefix("Bearer ") for t in fake.tokens_seen]


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    headers: CIMultiDict[str] = CIMultiDict()
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers.add(name.strip(), value.strip())
    if "Content-Length" in headers:
        body = await reader.readexactly(int(headers["Content-Length"]))
    elif headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readline()
        await reader.readline()
    else:
        body = await reader.read()
    return RawResponse(status, headers, body)


async def raw_exchange(base: str, request: bytes) -> RawResponse:
    """Send bytes as written (no client library in the way) and read one response."""
    url = URL(base)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


# -- the request as sent ----------------------------------------------------------------------


async def test_encoded_slash_repeated_and_empty_query_params_reach_the_upstream_unchanged(
    fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    path = "/echo/a%2Fb/c?x=1&x=2&empty=&y=%20z"
    echoed = await echo(http, proxy, path)
    assert echoed["raw_path"] == path


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method_is_forwarded_as_sent(
    method: str,
    fake: FakeRoyalti,
    fake_url: str,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    echoed = await echo(http, proxy, "/echo/m?q=1", method=method, data=b"abc")
    assert echoed["method"] == method
    assert echoed["raw_path"] == "/echo/m?q=1"
    assert echoed["body_len"] == 3
    assert fake.requests[-1].method == method


async def test_head_is_forwarded_and_answered_without_a_body(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    async with http.head(target(proxy, "/user/?page=2")) as resp:
        assert resp.status == 200
        assert await resp.read() == b""
        assert int(resp.headers["Content-Length"]) > 0
    assert fake.requests[-1].method == "HEAD"
    assert fake.requests[-1].raw_path == "/user/?page=2"


async def test_upstream_base_path_is_prepended_to_the_request_target(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    # An API key: Royalti's token endpoints would be looked up under the base path too.
    auth = {"email": None, "password": None, "api_key": "RWAK-demo-key"}
    proxy = await start_proxy(royalti_config(f"{fake_url}/echo", **auth))
    echoed = await echo(http, proxy, "/x?y=1")
    assert echoed["raw_path"] == "/echo/x?y=1"
    assert fake.requests[-1].raw_path == "/echo/x?y=1"


# -- workspaces -------------------------------------------------------------------------------


async def test_workspace_header_chooses_the_workspace_and_is_not_forwarded(
    fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    echoed = await echo(http, proxy, "/echo", headers={"X-Royalti-Workspace": "ws-beta"})
    assert echoed["workspace"] == "ws-beta"
    assert "x-royalti-workspace" not in header_names(echoed)


async def test_default_workspace_is_used_when_the_header_is_absent(
    fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    echoed = await echo(http, proxy, "/echo")
    assert echoed["workspace"] == WS[0]


async def test_workspace_outside_the_allowlist_is_refused_without_calling_the_upstream(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(with_workspace(fake_url, allowed_workspaces=[WS[0], "ws-beta"]))
    calls = fake.api_calls
    async with http.get(target(proxy, "/echo"), headers={"X-Royalti-Workspace": "ws-gamma"}) as r:
        body = await r.read()
        assert_proxy_error(r.status, r.headers, body, 403, "WORKSPACE_NOT_ALLOWED", [PASSWORD])
    assert fake.api_calls == calls
    assert fake.authtoken_calls["ws-gamma"] == 0


async def test_no_workspace_header_and_no_default_is_a_400(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(royalti_config(fake_url))
    async with http.get(target(proxy, "/echo")) as r:
        body = await r.read()
        assert_proxy_error(r.status, r.headers, body, 400, "WORKSPACE_REQUIRED", [PASSWORD])
    assert fake.api_calls == 0


async def test_custom_workspace_header_name_chooses_the_workspace_and_is_not_forwarded(
    fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(royalti_config(fake_url, workspace_header="X-Label-Workspace"))
    echoed = await echo(http, proxy, "/echo", headers={"X-Label-Workspace": "ws-delta"})
    assert echoed["workspace"] == "ws-delta"
    assert "x-label-workspace" not in header_names(echoed)


# -- headers ----------------------------------------------------------------------------------


async def test_client_authorization_is_replaced_and_unknown_headers_pass_through_in_order(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    sent = [
        ("X-A", "1"),
        ("Authorization", "Bearer from-the-client"),
        ("x-tenant-id", "tenant-7"),
        ("X-B", "2"),
        ("X-A", "3"),
    ]
    echoed = await echo(http, proxy, "/echo", headers=CIMultiDict(sent))
    (auth,) = header(echoed, "Authorization")
    assert auth.startswith("Bearer eyJ")
    assert "from-the-client" not in json.dumps(echoed)
    assert header(echoed, "x-tenant-id") == ["tenant-7"]
    relative = [(k, v) for k, v in echoed["headers"] if k.lower() in ("x-a", "x-b")]
    assert relative == [("X-A", "1"), ("X-B", "2"), ("X-A", "3")]
    assert fake.tokens_seen[-1] == auth


async def test_headers_pass_through_however_many_distinct_names_clients_send(
    fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    (route,) = proxy.routes
    for batch in range(12):  # 960 names never seen before: the cache of names stays bounded
        sent = [(f"X-Custom-{batch}-{i}", str(i)) for i in range(80)]
        sent.append(("Proxy-Authorization", "Basic c2VjcmV0"))  # dropped, cached or not
        echoed = await echo(http, proxy, "/echo", headers=CIMultiDict(sent))
        got = [(k, v) for k, v in echoed["headers"] if k.lower().startswith("x-custom-")]
        assert got == sent[:-1]
        assert header(echoed, "Proxy-Authorization") == []
        assert len(route.header_names) <= 512
    assert route.header_names  # and it is in use


async def test_forwarded_headers_are_added_and_host_is_the_upstreams(
    fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    echoed = await echo(http, proxy, "/echo", headers={"X-Forwarded-For": "203.0.113.7"})
    assert header(echoed, "Host") == [URL(fake_url).raw_authority]
    assert header(echoed, "X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert header(echoed, "X-Forwarded-Proto") == ["http"]
    assert header(echoed, "X-Forwarded-Host") == [URL(proxy.addresses["proxy"]).raw_authority]


async def test_a_request_without_host_gets_no_forwarded_host(
    fake_url: str, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    resp = await raw_exchange(proxy.addresses["proxy"], b"GET /echo HTTP/1.0\r\n\r\n")
    assert resp.status == 200, resp.body
    echoed = json.loads(resp.body)
    # Not this machine's own name, which aiohttp's request.host would have looked up.
    assert header(echoed, "X-Forwarded-Host") == []
    assert header(echoed, "X-Forwarded-For") == ["127.0.0.1"]


async def test_hop_by_hop_request_headers_are_not_forwarded(
    fake_url: str, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    request = (
        b"GET /echo/hop HTTP/1.1\r\n"
        b"Host: proxy.test\r\n"
        b"Connection: close, X-Hop-Named\r\n"
        b"X-Hop-Named: named-by-connection\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Authorization: Basic cHJveHk6c2VjcmV0\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: example/1\r\n"
        b"X-Kept: yes\r\n"
        b"\r\n"
    )
    resp = await raw_exchange(proxy.addresses["proxy"], request)
    assert resp.status == 200, resp.body
    echoed = json.loads(resp.body)
    names = header_names(echoed)
    for hop in ("x-hop-named", "keep-alive", "proxy-authorization", "te", "trailer", "upgrade"):
        assert hop not in names
    assert not any("x-hop-named" in v.lower() for v in header(echoed, "Connection"))
    assert header(echoed, "X-Kept") == ["yes"]
    assert "cHJveHk6c2VjcmV0" not in resp.body.decode()


async def test_headers_named_in_a_second_connection_line_are_not_forwarded(
    fake_url: str, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    request = (
        b"GET /echo HTTP/1.1\r\n"
        b"Host: proxy.test\r\n"
        b"Connection: close\r\n"
        b"Connection: X-Second-Hop\r\n"
        b"X-Second-Hop: hop\r\n"
        b"\r\n"
    )
    resp = await raw_exchange(proxy.addresses["proxy"], request)
    assert resp.status == 200
    assert "x-second-hop" not in header_names(json.loads(resp.body))


def hop_headers_app() -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        resp = web.Response(text="ok")
        resp.headers["Connection"] = "close, X-Custom-Hop"
        resp.headers["X-Custom-Hop"] = "1"
        resp.headers["Keep-Alive"] = "timeout=5"
        resp.headers["Proxy-Authenticate"] = "x"
        resp.headers["X-Kept"] = "yes"
        return resp

    async def second_line(request: web.Request) -> web.Response:
        resp = web.Response(text="ok")
        resp.headers.add("Connection", "keep-alive")
        resp.headers.add("Connection", "X-Second-Hop")
        resp.headers["X-Second-Hop"] = "1"
        return resp

    app = web.Application()
    app.router.add_get("/hop", handler)
    app.router.add_get("/second", second_line)
    return app


async def test_hop_by_hop_response_headers_are_not_relayed(
    serve: Serve, start_proxy: ProxyFactory
) -> None:
    upstream = await serve(hop_headers_app())
    # The upstream really sends them: otherwise this test would prove nothing.
    direct = await raw_exchange(upstream, b"GET /hop HTTP/1.1\r\nHost: u\r\n\r\n")
    assert direct.headers["X-Custom-Hop"] == "1"
    assert direct.headers["Proxy-Authenticate"] == "x"
    assert direct.headers["Keep-Alive"] == "timeout=5"

    proxy = await start_proxy(static_config(upstream))
    resp = await raw_exchange(proxy.addresses["proxy"], b"GET /hop HTTP/1.1\r\nHost: p\r\n\r\n")
    assert resp.status == 200
    assert resp.body == b"ok"
    assert resp.headers["X-Kept"] == "yes"
    for hop in ("X-Custom-Hop", "Keep-Alive", "Proxy-Authenticate"):
        assert hop not in resp.headers
    assert "X-Custom-Hop" not in resp.headers.get("Connection", "")


async def test_response_headers_named_in_a_second_connection_line_are_not_relayed(
    serve: Serve, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream = await serve(hop_headers_app())
    direct = await raw_exchange(upstream, b"GET /second HTTP/1.1\r\nHost: u\r\n\r\n")
    assert direct.headers.getall("Connection") == ["keep-alive", "X-Second-Hop"]
    proxy = await start_proxy(static_config(upstream))
    async with http.get(target(proxy, "/second")) as resp:
        assert resp.status == 200
        assert "X-Second-Hop" not in resp.headers


# -- responses --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204, 304, 400, 403, 404, 409, 422, 429, 500, 503])
async def test_upstream_status_and_body_reach_the_client_unchanged(
    status: int,
    fake: FakeRoyalti,
    fake_url: str,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    async with http.get(f"{fake_url}/status/{status}", headers=await auth_of(fake)) as direct:
        expected = await direct.read()
    async with http.get(target(proxy, f"/status/{status}")) as resp:
        assert resp.status == status
        assert await resp.read() == expected
        assert ERROR_HEADER not in resp.headers


async def test_a_small_response_leaves_the_proxy_in_one_write_head_and_body_together(
    serve: Serve, start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = json.dumps({"data": [{"id": n} for n in range(20)]}).encode()

    async def small(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/small", small)
    proxy = await start_proxy(static_config(await serve(app)))
    port = URL(proxy.addresses["proxy"]).port
    # Every write on a socket whose local end is the proxy's listener: what its clients get.
    writes: list[bytes] = []
    transport_class = asyncio.selector_events._SelectorSocketTransport  # type: ignore[attr-defined]
    original = transport_class.write

    def write(self: asyncio.Transport, data: bytes) -> None:
        if self.get_extra_info("sockname")[1] == port:
            writes.append(bytes(data))
        original(self, data)

    monkeypatch.setattr(transport_class, "write", write)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /small HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert response.startswith(b"HTTP/1.1 200 ")
    assert response.endswith(b"\r\n\r\n" + body)
    # Two writes would be two segments and two wake-ups of the client for one response.
    assert writes == [response]


async def auth_of(fake: FakeRoyalti) -> dict[str, str]:
    return {"Authorization": f"Bearer {fake.issue_access_token(WS[0])}"}


async def test_redirects_are_returned_to_the_client_not_followed(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    async with http.get(target(proxy, "/status/302"), allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "https://elsewhere.example/x"
    assert fake.api_calls == 1


# -- the proxy's own errors -------------------------------------------------------------------


async def test_unreachable_upstream_is_a_502_in_the_envelope(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(static_config(f"http://127.0.0.1:{free_port()}"))
    async with http.get(target(proxy, "/anything")) as r:
        body = await r.read()
        assert_proxy_error(r.status, r.headers, body, 502, "UPSTREAM_UNAVAILABLE", [STATIC_TOKEN])


async def test_upstream_that_does_not_answer_in_time_is_a_504_in_the_envelope(
    serve: Serve, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    never = asyncio.Event()
    entered = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        entered.set()
        await never.wait()
        return web.Response()  # pragma: no cover - never reached

    app = web.Application()
    app.router.add_get("/slow", stall)
    upstream = await serve(app)
    # The proxy's own read timeout is what is under test, so real time passes here (0.5 s).
    proxy = await start_proxy(static_config(upstream, timeouts={"read": "500ms"}))
    async with http.get(target(proxy, "/slow")) as r:
        body = await r.read()
        assert_proxy_error(r.status, r.headers, body, 504, "UPSTREAM_TIMEOUT", [STATIC_TOKEN])
    assert entered.is_set()


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET http://evil.example/x HTTP/1.1",
        b"CONNECT evil.example:443 HTTP/1.1",
    ],
    ids=["absolute-form", "connect"],
)
async def test_request_target_that_names_another_host_is_refused(
    request_line: bytes, fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    resp = await raw_exchange(
        proxy.addresses["proxy"],
        request_line + b"\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    assert_proxy_error(
        resp.status, resp.headers, resp.body, 400, "INVALID_REQUEST_TARGET", secrets_of(fake)
    )
    assert fake.api_calls == 0


async def test_routes_by_prefix_and_a_path_no_prefix_matches_is_a_404(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    config = with_workspace(fake_url)
    config["upstreams"][0]["path_prefix"] = "/api"
    config["upstreams"].append(
        {
            "name": "second",
            "url": f"{fake_url}/echo",
            "path_prefix": "/second/",
            "auth": {"type": "static", "token": "RWAK-demo-key"},
        }
    )
    proxy = await start_proxy(config)

    echoed = await echo(http, proxy, "/api/echo/x?y=1")
    assert echoed["raw_path"] == "/echo/x?y=1"
    assert echoed["workspace"] == WS[0]
    echoed = await echo(http, proxy, "/second/z")
    assert echoed["raw_path"] == "/echo/z"
    assert header(echoed, "Authorization") == ["Bearer RWAK-demo-key"]
    echoed = await echo(http, proxy, "/second?q=1")
    assert echoed["raw_path"] == "/echo/?q=1"

    calls = fake.api_calls
    for path in ("/nowhere", "/apix/echo", "/"):
        async with http.get(target(proxy, path)) as r:
            body = await r.read()
            assert_proxy_error(r.status, r.headers, body, 404, "NO_ROUTE", secrets_of(fake))
    assert fake.api_calls == calls


# -- replay on 401 ----------------------------------------------------------------------------


async def revoke_current_token(fake: FakeRoyalti, proxy: Proxy, http: aiohttp.ClientSession) -> str:
    """Make one request so a token is cached, then revoke that token at the fake."""
    await echo(http, proxy, "/echo")
    token = fake.tokens_seen[-1].removeprefix("Bearer ")
    fake.revoke_access_token(token)
    return token


async def test_revoked_token_is_renewed_and_the_request_replayed_with_the_same_body(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    revoked = await revoke_current_token(fake, proxy, http)
    sent = len(fake.requests)
    payload = json.dumps({"title": "Track", "units": list(range(100))}).encode()

    echoed = await echo(
        http, proxy, "/echo", method="POST", data=payload, headers={"Content-Type": "x/json"}
    )
    assert echoed["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert len(fake.requests) == sent + 2
    assert fake.requests[-1].body_sha256 == fake.requests[-2].body_sha256
    assert fake.tokens_seen[-2] == f"Bearer {revoked}"
    assert fake.tokens_seen[-1] != f"Bearer {revoked}"
    assert fake.unauthorized == 1


async def test_chunked_body_is_replayed_whole_after_a_401(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    await revoke_current_token(fake, proxy, http)
    parts = [b"first,", b"second,", b"third"]

    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    echoed = await echo(http, proxy, "/echo", method="PUT", data=chunks())
    assert echoed["body_len"] == len(b"".join(parts))
    assert fake.requests[-1].body_sha256 == fake.requests[-2].body_sha256
    assert fake.unauthorized == 1


async def test_burst_after_revocation_renews_the_token_once(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    await revoke_current_token(fake, proxy, http)
    renewals = sum(fake.authtoken_calls.values())

    results = await asyncio.gather(*(echo(http, proxy, f"/echo/{i}") for i in range(20)))
    assert [r["raw_path"] for r in results] == [f"/echo/{i}" for i in range(20)]
    assert sum(fake.authtoken_calls.values()) == renewals + 1
    # Requests that reached the proxy after the renewal used the fresh token from the start.
    assert 1 <= fake.unauthorized <= 20


async def test_body_larger_than_replay_max_body_is_not_replayed_and_the_401_is_returned(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    config = with_workspace(fake_url)
    config["upstreams"][0]["replay_max_body"] = "1KiB"
    proxy = await start_proxy(config)
    await revoke_current_token(fake, proxy, http)
    sent = len(fake.requests)

    async with http.post(target(proxy, "/echo"), data=b"x" * 4096) as resp:
        assert resp.status == 401
        assert ERROR_HEADER not in resp.headers  # the upstream's own answer
        assert (await resp.json())["error"]["code"] == "UNAUTHORIZED"
    assert len(fake.requests) == sent + 1
    assert fake.requests[-1].body_len == 4096


async def test_body_over_one_mib_but_within_replay_max_body_is_forwarded(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    config = with_workspace(fake_url)
    config["upstreams"][0]["replay_max_body"] = "4MiB"
    proxy = await start_proxy(config)
    payload = b"r" * (2 * 1024 * 1024)
    async with http.post(target(proxy, "/echo"), data=io.BytesIO(payload)) as resp:
        assert resp.status == 200
        assert (await resp.json())["body_len"] == len(payload)


async def test_chunked_body_rejected_before_it_was_read_is_never_replayed_truncated(
    serve: Serve, start_proxy: ProxyFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("old-token")
    replayed = asyncio.Event()
    received: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") == "Bearer old-token":
            # Like an API whose auth middleware runs before the body is parsed.
            return web.json_response({"success": False}, status=401)
        received.append(await request.read())
        replayed.set()
        return web.json_response({"len": len(received[-1])})

    app = web.Application()
    app.router.add_post("/upload", handler)
    upstream = await serve(app)
    config = static_config(upstream)
    config["upstreams"][0]["auth"] = {"type": "static", "token_file": str(token_file)}
    proxy = await start_proxy(config)
    await proxy.managers["own"].wait_idle()  # "old-token" is cached
    token_file.write_text("a-new-token")  # what the proxy reads after the rejection

    whole = b"head-" + b"tail" * 1000

    async def body() -> AsyncIterator[bytes]:
        yield whole[:5]
        # The rest comes once the upstream has seen a replay (or after 2 s, if none comes).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(replayed.wait(), 2)
        yield whole[5:]

    async with http.post(target(proxy, "/upload"), data=body()) as resp:
        if resp.status == 200:
            assert (await resp.json())["len"] == len(whole)
        else:
            assert resp.status == 401
    assert all(r == whole for r in received)


async def test_api_key_is_sent_as_bearer_without_any_token_exchange(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        royalti_config(fake_url, email=None, password=None, api_key="RWAK-demo-key")
    )
    echoed = await echo(http, proxy, "/echo", headers={"X-Royalti-Workspace": "ws-beta"})
    assert header(echoed, "Authorization") == ["Bearer RWAK-demo-key"]
    assert echoed["workspace"] == WS[0]  # the key's own workspace
    assert "x-royalti-workspace" not in header_names(echoed)
    assert fake.login_calls == 0
    assert sum(fake.authtoken_calls.values()) == 0


async def test_expect_100_continue_gets_100_continue_then_the_upstream_answer(
    fake_url: str, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    url = URL(proxy.addresses["proxy"])
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        # Real time: curl gives up waiting after 1 s; a proxy that answers at all does so at once.
        interim = await asyncio.wait_for(reader.readline(), 1.0)
        assert interim.startswith(b"HTTP/1.1 100")
        assert await reader.readline() == b"\r\n"
        writer.write(b"hello")
        final = await read_response(reader)
        assert final.status == 200
        assert json.loads(final.body)["body_len"] == 5
    finally:
        writer.close()


@pytest.mark.parametrize(
    "path",
    [
        "/echo/../user/",
        "/echo/./x",
        "/echo/..",
        "/echo/%2e%2e/x",
        "/echo/%2E./x",
        "/echo/..%2f..%2fx",
        "/..%2F..%2Fetc",
    ],
)
async def test_a_path_with_dot_segments_is_refused_so_it_cannot_leave_the_base_path(
    path: str, fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    resp = await raw_exchange(
        proxy.addresses["proxy"],
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert_proxy_error(
        resp.status, resp.headers, resp.body, 400, "INVALID_REQUEST_TARGET", secrets_of(fake)
    )
    assert fake.api_calls == 0


async def test_dots_inside_a_segment_are_forwarded_unchanged(
    fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(with_workspace(fake_url))
    echoed = await echo(http, proxy, "/echo/report.v2.csv/..x/.hidden?a=..")
    assert echoed["raw_path"] == "/echo/report.v2.csv/..x/.hidden?a=.."


async def test_the_clients_authorization_is_dropped_when_the_credential_goes_in_another_header(
    serve: Serve, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    seen: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/{tail:.*}", record)
    url = await serve(app)
    proxy = await start_proxy(
        static_config(url, inject={"header": "X-API-Key", "format": "{token}"})
    )
    async with http.get(
        target(proxy, "/x"), headers={"Authorization": "Bearer client-own", "X-API-Key": "c"}
    ) as resp:
        assert resp.status == 200
    assert seen[0]["X-API-Key"] == STATIC_TOKEN
    assert "Authorization" not in seen[0]


async def test_with_auth_type_none_the_clients_authorization_passes_through(
    serve: Serve, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    seen: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/{tail:.*}", record)
    url = await serve(app)
    config = static_config(url)
    config["upstreams"][0]["auth"] = {"type": "none"}
    proxy = await start_proxy(config)
    async with http.get(target(proxy, "/x"), headers={"Authorization": "Bearer mine"}) as resp:
        assert resp.status == 200
    assert seen[0]["Authorization"] == "Bearer mine"


async def test_auth_url_sends_token_calls_outside_the_upstreams_base_path(
    fake: FakeRoyalti, fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    config = with_workspace(fake_url, auth_url=fake_url)
    config["upstreams"][0]["url"] = f"{fake_url}/echo"
    proxy = await start_proxy(config)
    echoed = await echo(http, proxy, "/x?y=1")
    assert echoed["raw_path"] == "/echo/x?y=1"
    assert echoed["workspace"] == WS[0]
    assert fake.login_calls == 1


async def _raw_upstream(head: bytes, body: bytes) -> tuple[asyncio.Server, str]:
    """An upstream that answers every request on a keep-alive connection with ``head`` and
    ``body`` as given: no Date, Server or Content-Type of aiohttp's own."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(head + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _exchange(port: int, request: bytes, body: bytes) -> bytes:
    """One request on a keep-alive connection; the response's bytes up to its body's end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        rest = await asyncio.wait_for(reader.readexactly(len(body)), 5)
    finally:
        writer.close()
    return head + rest


@pytest.mark.parametrize(
    ("head", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Order: 1\r\nX-Order: 2\r\n\r\n", b"hello"),
        (b"HTTP/1.1 404 Not Here\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\r\n", b""),
        (
            b"HTTP/1.1 201 Created\r\nServer: up/1\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
            b"Content-Length: 2\r\nContent-Type: application/json\r\n\r\n",
            b"{}",
        ),
    ],
)
async def test_a_whole_response_written_by_the_proxy_is_the_one_aiohttp_would_write(
    head: bytes, body: bytes, start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy serialises a response whose body arrived whole itself (proxy/relaying.py
    _write_whole); its bytes are the ones aiohttp's StreamResponse writes for it, Date aside."""
    import proxy.relaying as relaying

    server, url = await _raw_upstream(head, body)
    async with server:
        proxy = await start_proxy(static_config(url))
        port = URL(proxy.addresses["proxy"]).port
        assert port is not None
        request = b"GET /x HTTP/1.1\r\nHost: p\r\n\r\n"
        used: list[bool] = []
        original = relaying._write_whole

        def spy(*args: Any) -> web.StreamResponse | None:
            out = original(*args)
            used.append(out is not None)
            return out

        monkeypatch.setattr(relaying, "_write_whole", spy)
        fast = await _exchange(port, request, body)
        monkeypatch.setattr(relaying, "_write_whole", lambda *args: None)
        slow = await _exchange(port, request, body)
    assert used == [True]

    def lines(raw: bytes) -> list[bytes]:
        return [
            b"Date: *" if x.startswith(b"Date: ") and b"2024" not in x else x
            for x in raw.split(b"\r\n")
        ]

    assert lines(fast) == lines(slow)
    assert fast.endswith(b"\r\n\r\n" + body)


@pytest.mark.parametrize(
    ("request_line", "head", "why"),
    [
        (b"HEAD /x HTTP/1.1", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD"),
        (b"GET /x HTTP/1.0", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HTTP/1.0"),
        (b"GET /x HTTP/1.1", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked"),
    ],
)
async def test_a_response_outside_the_common_case_takes_aiohttps_own_path(
    request_line: bytes,
    head: bytes,
    why: str,
    start_proxy: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import proxy.relaying as relaying

    body = {"HEAD": b"", "chunked": b"5\r\nhello\r\n0\r\n\r\n"}.get(why, b"hello")
    server, url = await _raw_upstream(head, body)
    results: list[bool] = []
    original = relaying._write_whole

    def spy(*args: Any) -> web.StreamResponse | None:
        out = original(*args)
        results.append(out is not None)
        return out

    monkeypatch.setattr(relaying, "_write_whole", spy)
    async with server:
        proxy = await start_proxy(static_config(url))
        port = URL(proxy.addresses["proxy"]).port
        assert port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request_line + b"\r\nHost: p\r\nConnection: close\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
    assert raw.split(b" ", 2)[1] == b"200", why
    assert results in ([], [False]), why
