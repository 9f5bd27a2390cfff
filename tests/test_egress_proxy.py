"""Through a real forward proxy: tinyproxy (from Debian, installed by .ci/run), started per test
on a free port with its own configuration and access log. The log is the egress proxy's own
account of what went through it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy.app import Proxy
from proxy.clock import FakeClock
from proxy.fakes.oauth2 import FakeOAuth2, start_fake_oauth2
from proxy.fakes.royalti import FakeRoyalti
from tests.binaries import require_binary
from tests.conftest import PASSWORD, WS, ProxyFactory, Serve, free_port, royalti_config
from tests.faults.servers import RawRequest, RawServer
from tests.test_interop_keepalive import TOKEN, answer, static_config, target


@dataclass
class TinyProxy:
    url: str
    log: Path

    def lines(self) -> list[str]:
        """What tinyproxy logged about requests: ``Request (file descriptor N): GET ...``."""
        text = self.log.read_text() if self.log.exists() else ""
        return [line.split("): ", 1)[1] for line in text.splitlines() if "Request (file" in line]


StartTinyProxy = Callable[..., Awaitable[TinyProxy]]


@pytest.fixture
async def tinyproxy(tmp_path: Path) -> AsyncIterator[StartTinyProxy]:
    """``await tinyproxy(basic_auth=("user", "pw"))``: a running tinyproxy, stopped at the end."""
    binary = require_binary("tinyproxy")
    procs: list[asyncio.subprocess.Process] = []

    async def start(basic_auth: tuple[str, str] | None = None) -> TinyProxy:
        port = free_port()
        log = tmp_path / f"tinyproxy-{port}.log"
        conf = tmp_path / f"tinyproxy-{port}.conf"
        lines = [
            f"Port {port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            f'LogFile "{log}"',
            "LogLevel Connect",  # one line per connection and per request line
            "MaxClients 50",
            "Allow 127.0.0.1",
            "DisableViaHeader Yes",
        ]
        # Without a ConnectPort line tinyproxy tunnels to any port (the fakes' are random).
        if basic_auth is not None:
            lines.append(f"BasicAuth {basic_auth[0]} {basic_auth[1]}")
        conf.write_text("\n".join(lines) + "\n")
        proc = await asyncio.create_subprocess_exec(
            binary,
            "-d",
            "-c",
            str(conf),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        procs.append(proc)
        # Ready once it accepts a connection (it binds after reading its configuration).
        for _ in range(500):
            if proc.returncode is not None:
                pytest.fail(f"tinyproxy exited with {proc.returncode}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.01)
                continue
            writer.close()
            await writer.wait_closed()
            return TinyProxy(f"http://127.0.0.1:{port}", log)
        pytest.fail("tinyproxy did not start listening")

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def tls_fake_url(fake: FakeRoyalti, ca: trustme.CA) -> AsyncIterator[str]:
    """The fake Royalti API over HTTPS, with a certificate for 127.0.0.1 from ``ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    runner = web.AppRunner(fake.app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
    port = runner.addresses[0][1]
    yield f"https://127.0.0.1:{port}"
    await runner.cleanup()


def with_tls(data: dict[str, Any], ca_file: str) -> dict[str, Any]:
    data["upstreams"][0]["tls"] = {"ca_file": ca_file}
    return data


async def get(http: aiohttp.ClientSession, proxy: Proxy, path: str) -> tuple[int, Any]:
    async with http.get(
        proxy.addresses["proxy"] + path, headers={"X-Royalti-Workspace": WS[0]}
    ) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_royalti_login_authtoken_and_request_go_through_the_egress_proxy_as_absolute_form(
    tinyproxy: StartTinyProxy,
    fake: FakeRoyalti,
    fake_url: str,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    egress = await tinyproxy()
    proxy = await start_proxy(royalti_config(fake_url), env={"HTTP_PROXY": egress.url})
    status, _ = await get(http, proxy, "/user/?page=1")
    assert status == 200
    seen = egress.lines()
    # Plain HTTP: the egress proxy gets each request in absolute form (RFC 9112 §3.2.2).
    assert f"POST {fake_url}/auth/login HTTP/1.1" in seen
    assert any(s.startswith(f"GET {fake_url}/auth/authtoken?currentWorkspace=") for s in seen)
    assert f"GET {fake_url}/user/?page=1 HTTP/1.1" in seen
    assert not any(s.startswith("CONNECT") for s in seen)
    assert fake.login_calls == 1


async def test_https_upstream_goes_through_connect_and_the_egress_proxy_never_sees_the_token(
    tinyproxy: StartTinyProxy,
    fake: FakeRoyalti,
    tls_fake_url: str,
    ca_file: str,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    egress = await tinyproxy()
    data = with_tls(royalti_config(tls_fake_url), ca_file)
    proxy = await start_proxy(data, env={"HTTPS_PROXY": egress.url, "HTTP_PROXY": "http://x:1"})
    status, _ = await get(http, proxy, "/user/?page=1")
    assert status == 200
    # The fake got the bearer token end to end...
    token = dict(fake.requests[-1].headers)["Authorization"]
    assert token.startswith("Bearer ")
    # ...and the egress proxy saw only tunnels: login, authtoken and the request inside them.
    seen = egress.lines()
    authority = tls_fake_url.removeprefix("https://")
    assert seen and all(s == f"CONNECT {authority} HTTP/1.1" for s in seen), seen
    log = egress.log.read_text()
    assert "Authorization" not in log
    assert token.removeprefix("Bearer ") not in log
    assert PASSWORD not in log
    assert "/user/" not in log and "/auth/" not in log


async def test_no_proxy_bypasses_the_egress_proxy(
    tinyproxy: StartTinyProxy,
    fake_url: str,
    serve: Serve,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    egress = await tinyproxy()

    async def hello(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    other = web.Application()
    other.router.add_get("/hello", hello)
    other_url = await serve(other)
    data = royalti_config(fake_url)
    data["upstreams"].append(
        {"name": "other", "url": other_url, "path_prefix": "/other/", "auth": {"type": "none"}}
    )
    # The fake Royalti's port is listed; the other upstream (same host, another port) is not.
    env = {"HTTP_PROXY": egress.url, "NO_PROXY": f"example.com,{fake_url.removeprefix('http://')}"}
    proxy = await start_proxy(data, env=env)
    status, _ = await get(http, proxy, "/user/")
    assert status == 200
    status, _ = await get(http, proxy, "/other/hello")
    assert status == 200
    assert egress.lines() == [f"GET {other_url}/hello HTTP/1.1"]


async def test_the_upstream_setting_overrides_the_environment(
    tinyproxy: StartTinyProxy,
    fake_url: str,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    egress = await tinyproxy()
    dead = f"http://127.0.0.1:{free_port()}"
    data = royalti_config(fake_url)
    data["upstreams"][0]["egress"] = {"proxy": egress.url}
    data["upstreams"][0]["token_egress"] = {"proxy": "none"}
    proxy = await start_proxy(data, env={"HTTP_PROXY": dead})
    status, _ = await get(http, proxy, "/user/")
    assert status == 200
    seen = egress.lines()
    assert seen == [f"GET {fake_url}/user/ HTTP/1.1"]  # token endpoints went direct


async def test_proxy_credentials_from_a_file_are_accepted(
    tinyproxy: StartTinyProxy,
    fake: FakeRoyalti,
    tls_fake_url: str,
    ca_file: str,
    tmp_path: Path,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    egress = await tinyproxy(basic_auth=("svc", "egress-pw"))
    secret = tmp_path / "egress-password"
    secret.write_text("egress-pw\n")
    data = with_tls(royalti_config(tls_fake_url), ca_file)
    data["upstreams"][0]["egress"] = {
        "proxy": egress.url,
        "username": "svc",
        "password_file": str(secret),
    }
    proxy = await start_proxy(data)
    status, _ = await get(http, proxy, "/user/")
    assert status == 200
    assert len(egress.lines()) >= 2  # the token endpoints' tunnel(s) and the request's
    assert fake.login_calls == 1


async def test_a_wrong_proxy_password_is_refused_with_errors_naming_the_egress_proxy(
    tinyproxy: StartTinyProxy,
    fake: FakeRoyalti,
    tls_fake_url: str,
    ca_file: str,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    egress = await tinyproxy(basic_auth=("svc", "egress-pw"))
    env = {"HTTPS_PROXY": f"http://svc:wrong-pw@{egress.url.removeprefix('http://')}"}
    # A static credential: no token endpoint, so the forwarded request meets the refusal.
    data = with_tls(royalti_config(tls_fake_url), ca_file)
    data["upstreams"][0]["auth"] = {"type": "static", "token": "static-token"}
    proxy = await start_proxy(data, env=env)
    async with http.get(proxy.addresses["proxy"] + "/user/") as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"]["code"] == "UPSTREAM_UNAVAILABLE"
    assert body["error"]["details"] == ["cause: egress_proxy"]
    assert f"the egress proxy {egress.url} refused the CONNECT" in body["error"]["message"]
    assert "wrong-pw" not in str(body)
    metrics = await (await http.get(proxy.addresses["admin"] + "/metrics")).text()
    assert 'royalti_proxy_egress_errors_total{upstream="royalti"} 1.0' in metrics
    assert "wrong-pw" not in metrics
    # The token endpoint meets it too: 503, with the cause in the details and in /tokens.
    royalti = await start_proxy(with_tls(royalti_config(tls_fake_url), ca_file), env=env)
    status, body = await get(http, royalti, "/user/")
    assert status == 503
    assert body["error"]["code"] == "TOKEN_UNAVAILABLE"
    assert body["error"]["details"] == ["last error: EGRESS_PROXY"]
    async with http.get(royalti.addresses["admin"] + "/tokens") as resp:
        tokens = await resp.json()
    errors = [t["last_error"] for t in tokens["upstreams"][0]["tokens"]]
    assert errors and all("EGRESS_PROXY" in e for e in errors)
    assert "wrong-pw" not in str(tokens)
    assert fake.login_calls == 0


async def test_an_unreachable_egress_proxy_gives_the_documented_errors(
    fake_url: str, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    data = royalti_config(fake_url)
    data["upstreams"][0]["auth"] = {"type": "static", "token": "static-token"}
    proxy = await start_proxy(data, env={"HTTP_PROXY": dead})
    async with http.get(proxy.addresses["proxy"] + "/user/") as resp:
        assert resp.status == 502
        assert resp.headers["X-Royalti-Proxy-Error"] == "UPSTREAM_UNAVAILABLE"
        body = await resp.json()
    assert body["error"]["message"] == (
        f"upstream royalti unreachable: the egress proxy {dead} could not be reached"
    )
    assert body["error"]["details"] == ["cause: egress_proxy"]
    # A WebSocket handshake meets the same egress proxy, and both are counted as its failures.
    with pytest.raises(aiohttp.WSServerHandshakeError) as handshake:
        await http.ws_connect(proxy.addresses["proxy"] + "/socket.io/")
    assert handshake.value.status == 502
    metrics = await (await http.get(proxy.addresses["admin"] + "/metrics")).text()
    assert 'royalti_proxy_egress_errors_total{upstream="royalti"} 2.0' in metrics

    royalti = await start_proxy(royalti_config(fake_url), env={"HTTP_PROXY": dead})
    status, body = await get(http, royalti, "/user/")
    assert status == 503
    assert body["error"]["code"] == "TOKEN_UNAVAILABLE"
    assert body["error"]["details"] == ["last error: EGRESS_PROXY"]
    metrics = await (await http.get(royalti.addresses["admin"] + "/metrics")).text()
    assert 'outcome="EGRESS_PROXY"' in metrics


def test_ci_installs_the_forward_proxy() -> None:
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "tinyproxy" in ci.split("packages=(", 1)[1].split(")", 1)[0]
    assert os.environ.get("CI") is None or require_binary("tinyproxy")


async def test_an_oauth2_token_endpoint_goes_through_token_egress_only(
    tinyproxy: StartTinyProxy,
    clock: FakeClock,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    egress = await tinyproxy()
    oauth = FakeOAuth2(clients={"c": "s"}, users={"agent": "pw"}, wall=clock.wall)
    runner, oauth_url = await start_fake_oauth2(oauth)
    try:
        data = {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0"},
            "upstreams": [
                {
                    "name": "vbot",
                    "url": f"{oauth_url}/api",
                    "path_prefix": "/vbot/",
                    "auth": {
                        "type": "oauth2_password",
                        "token_url": f"{oauth_url}/token",
                        "username": "agent",
                        "password": "pw",
                        "client_id": "c",
                        "client_secret": "s",
                    },
                    "egress": {"proxy": "none"},
                    "token_egress": {"proxy": egress.url},
                }
            ],
        }
        proxy = await start_proxy(data, env={"HTTP_PROXY": f"http://127.0.0.1:{free_port()}"})
        async with http.get(proxy.addresses["proxy"] + "/vbot/v2.0/calls") as resp:
            assert resp.status == 200
        assert egress.lines() == [f"POST {oauth_url}/token HTTP/1.1"]
    finally:
        await runner.cleanup()


async def test_a_websocket_handshake_to_an_https_upstream_goes_through_connect(
    tinyproxy: StartTinyProxy,
    ca: trustme.CA,
    ca_file: str,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    egress = await tinyproxy()
    seen_auth: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen_auth.append(request.headers.get("Authorization", ""))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(f"echo:{msg.data}")
        return ws

    app = web.Application()
    app.router.add_get("/socket.io/", handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
    authority = f"127.0.0.1:{runner.addresses[0][1]}"
    try:
        data = {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0"},
            "upstreams": [
                {
                    "name": "rt",
                    "url": f"https://{authority}",
                    "auth": {"type": "static", "token": "ws-token"},
                    "tls": {"ca_file": ca_file},
                }
            ],
        }
        proxy = await start_proxy(data, env={"HTTPS_PROXY": egress.url})
        async with http.ws_connect(proxy.addresses["proxy"] + "/socket.io/") as ws:
            await ws.send_str("hi")
            assert (await ws.receive()).data == "echo:hi"
        assert seen_auth == ["Bearer ws-token"]
        assert egress.lines() == [f"CONNECT {authority} HTTP/1.1"]
        assert "ws-token" not in egress.log.read_text()
    finally:
        await runner.cleanup()


async def test_the_stale_connection_retry_goes_through_the_egress_proxy_too(
    tinyproxy: StartTinyProxy,
    ca: trustme.CA,
    ca_file: str,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """The retry's new connection (``Route.fresh_session``) is a tunnel through the egress proxy,
    as the first attempts' are: an upstream reachable only through it stays reachable on a
    retry. The upstream drops the first two requests (aiohttp's attempt and its own retry) as
    they arrive and answers the third, the proxy's. HTTPS, so that the egress proxy's
    connections are tunnels that carry the drop through (over plain HTTP tinyproxy would answer
    the proxy itself)."""
    egress = await tinyproxy()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    dropped: list[RawRequest] = []
    answered: list[RawRequest] = []

    async def drop_two_then_answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RawServer
    ) -> None:
        while True:
            request = await server.next_request(reader)
            if len(dropped) < 2:
                dropped.append(request)
                return  # closed unanswered, as a stale connection fails
            answered.append(request)
            writer.write(answer(request))
            await writer.drain()

    async with RawServer(drop_two_then_answer, tls=ctx) as upstream:
        data = with_tls(static_config(upstream.url), ca_file)
        data["upstreams"][0]["egress"] = {"proxy": egress.url}
        proxy = await start_proxy(data)
        async with http.get(target(proxy, "/retried")) as resp:
            assert resp.status == 200
            assert await resp.read() == b"GET 0"
        assert proxy.routes[0].stats.stale_retries == 1
        assert [r.line.split()[1] for r in dropped + answered] == [b"/retried"] * 3
        assert answered[0].headers["Authorization"] == f"Bearer {TOKEN}"
        # Each attempt on a connection of its own, and every one of them a tunnel: the
        # retry's (the third) included.
        assert upstream.connections == 3
        assert egress.lines() == [f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1"] * 3
        assert TOKEN not in egress.log.read_text()
