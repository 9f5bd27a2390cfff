"""Several upstreams in one proxy, routed by path prefix, each with its own auth, injection rule,
TLS settings and replay statuses: Royalti next to plain OAuth2 APIs such as VBot's."""

from __future__ import annotations

import asyncio
import os
import ssl

import pytest
import trustme
from aiohttp import web

from proxy.fakes.oauth2 import FakeOAuth2, start_fake_oauth2
from tests.conftest import WS, royalti_config, run_for

USER, PASSWORD = "agent", "p@ss w0rd"
CLIENT, SECRET = "vbot-client", "s3cr3t:+/"


@pytest.fixture
def oauth(clock) -> FakeOAuth2:
    return FakeOAuth2(clients={CLIENT: SECRET}, users={USER: PASSWORD}, wall=clock.wall)


@pytest.fixture
async def oauth_url(oauth):
    runner, url = await start_fake_oauth2(oauth)
    yield url
    await runner.cleanup()


def vbot_upstream(oauth_url: str, **extra) -> dict:
    up = {
        "name": "vbot",
        "url": f"{oauth_url}/api",
        "path_prefix": "/vbot/",
        "auth": {
            "type": "oauth2_password",
            "token_url": f"{oauth_url}/token",
            "username": USER,
            "password": PASSWORD,
            "client_id": CLIENT,
            "client_secret": SECRET,
        },
    }
    up.update(extra)
    return up


async def _get(http, proxy, path, **kw):
    async with http.get(proxy.addresses["proxy"] + path, **kw) as resp:
        return resp.status, await resp.json()


async def test_two_upstreams_are_routed_by_longest_prefix_with_the_prefix_stripped(
    start_proxy, fake, fake_url, oauth, oauth_url, http
):
    config = royalti_config(fake_url, default_workspace=WS[0])
    config["upstreams"].append(vbot_upstream(oauth_url))
    proxy = await start_proxy(config)
    status, body = await _get(http, proxy, "/vbot/v2.0/calls?x=1")
    assert status == 200
    assert body["path"].endswith("/api/v2.0/calls")
    assert oauth.auth_headers_seen[-1] == "authorization"
    status, body = await _get(http, proxy, "/user/")
    assert (status, body["workspace"]) == (200, WS[0])
    status, body = await _get(http, proxy, "/vbotx/")  # not under /vbot/: Royalti's
    assert fake.requests[-1].raw_path == "/vbotx/"


async def test_each_upstream_uses_its_own_injection_header(
    start_proxy, fake, fake_url, oauth, oauth_url, http
):
    config = royalti_config(fake_url, default_workspace=WS[0])
    # VBot v3 style: the token goes in X-API-Key, bare.
    config["upstreams"].append(
        vbot_upstream(oauth_url, inject={"header": "X-API-Key", "format": "{token}"})
    )
    proxy = await start_proxy(config)
    status, body = await _get(http, proxy, "/vbot/things", headers={"X-API-Key": "client-sent"})
    assert status == 200
    assert oauth.auth_headers_seen[-1] == "x-api-key"
    sent = (
        {k.lower(): v for k, v in body["headers"].items()}
        if isinstance(body["headers"], dict)
        else {k.lower(): v for k, v in body["headers"]}
    )
    assert sent["x-api-key"] == oauth.issued[-1]
    assert "authorization" not in sent
    await _get(http, proxy, "/user/")
    assert fake.tokens_seen[-1].startswith("Bearer ey")


async def test_a_path_no_prefix_matches_is_404_no_route(start_proxy, oauth_url, http):
    proxy = await start_proxy(
        {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0"},
            "upstreams": [vbot_upstream(oauth_url)],
        }
    )
    async with http.get(proxy.addresses["proxy"] + "/other") as resp:
        assert resp.status == 404
        assert resp.headers["X-Royalti-Proxy-Error"] == "NO_ROUTE"
        assert (await resp.json())["error"]["code"] == "NO_ROUTE"


async def test_password_grant_then_rotating_refresh_grants_over_many_lifetimes(
    clock, start_proxy, oauth, oauth_url, http
):
    proxy = await start_proxy(
        {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0"},
            "upstreams": [vbot_upstream(oauth_url)],
        }
    )
    await proxy.managers["vbot"].wait_idle()
    for _ in range(5 * 30):  # five 899 s lifetimes, a request every 30 s
        await run_for(clock, proxy, 30, 10)
        status, _ = await _get(http, proxy, "/vbot/x")
        assert status == 200
    assert oauth.calls["password"] == 1
    assert 5 <= oauth.calls["refresh_token"] <= 8
    assert oauth.reused_refresh_tokens == 0
    assert proxy.managers["vbot"].waits == 0


async def test_a_burst_of_requests_at_expiry_causes_one_refresh(
    clock, start_proxy, oauth, oauth_url, http
):
    proxy = await start_proxy(
        {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0"},
            "upstreams": [vbot_upstream(oauth_url)],
        }
    )
    manager = proxy.managers["vbot"]
    await manager.wait_idle()
    (state,) = manager.states()
    # Jump straight past expiry without letting the background renewal run.
    await clock.advance(state.expires_in + 1)
    results = await asyncio.gather(*(_get(http, proxy, "/vbot/x") for _ in range(100)))
    assert all(status == 200 for status, _ in results)
    assert oauth.calls["refresh_token"] == 1
    assert oauth.reused_refresh_tokens == 0


async def test_invalid_grant_on_refresh_falls_back_to_one_password_grant(
    clock, start_proxy, oauth, oauth_url, http
):
    proxy = await start_proxy(
        {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0"},
            "upstreams": [vbot_upstream(oauth_url)],
        }
    )
    await proxy.managers["vbot"].wait_idle()
    oauth.revoke_all_refresh_tokens()
    await run_for(clock, proxy, 899, 10)
    status, _ = await _get(http, proxy, "/vbot/x")
    assert status == 200
    assert oauth.calls["password"] == 2


async def test_invalid_client_stops_fast_retries_and_keeps_the_upstream_not_ready(
    clock, start_proxy, oauth, oauth_url, http, caplog
):
    up = vbot_upstream(oauth_url)
    up["auth"]["client_secret"] = "wrong"
    proxy = await start_proxy(
        {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "upstreams": [up]}
    )
    await proxy.managers["vbot"].wait_idle()
    await run_for(clock, proxy, 600, 5)  # ten simulated minutes
    assert sum(oauth.calls.values()) <= 3  # max_backoff (5 min) apart, not a storm
    reasons = proxy.readiness()
    assert reasons and "invalid_client" in reasons[0]
    status, body = await _get(http, proxy, "/vbot/x")
    assert (status, body["error"]["code"]) == (503, "TOKEN_UNAVAILABLE")


async def test_a_renewal_never_strands_a_request_in_flight_with_the_token_it_replaced(
    clock, start_proxy, http
):
    """Some servers revoke the old access token the moment a refresh succeeds, and answer 403
    for it: the request in flight with the old token is replayed with the new one."""
    oauth = FakeOAuth2(
        clients={CLIENT: SECRET},
        users={USER: PASSWORD},
        wall=clock.wall,
        revoke_old_access_on_refresh=True,
    )
    runner, oauth_url = await start_fake_oauth2(oauth)
    gate = asyncio.Event()
    arrived = asyncio.Event()
    seen: list[str] = []

    async def slow_api(request: web.Request) -> web.Response:
        token = request.headers["Authorization"].removeprefix("Bearer ")
        seen.append(token)
        if len(seen) == 1:
            arrived.set()
            await gate.wait()  # the renewal happens while this request is in flight
        return web.json_response({}, status=200 if oauth.is_valid(token) else 403)

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow_api)
    api = web.AppRunner(app)
    await api.setup()
    await web.TCPSite(api, "127.0.0.1", 0).start()
    try:
        up = vbot_upstream(oauth_url, url=f"http://127.0.0.1:{api.addresses[0][1]}")
        up["replay_on"] = [401, 403]
        proxy = await start_proxy(
            {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "upstreams": [up]}
        )
        manager = proxy.managers["vbot"]
        await manager.wait_idle()
        request = asyncio.ensure_future(_get(http, proxy, "/vbot/x"))
        await asyncio.wait_for(arrived.wait(), 5)
        await run_for(clock, proxy, 880, 10)  # past the refresh point: the old token is revoked
        assert oauth.calls["refresh_token"] == 1
        gate.set()
        status, _ = await request
        assert status == 200
        assert len(seen) == 2 and seen[0] != seen[1]
    finally:
        await api.cleanup()
        await runner.cleanup()


async def test_a_static_token_file_is_picked_up_without_a_restart_when_its_symlink_is_swapped(
    clock, tmp_path, start_proxy, http
):
    received: list[str] = []

    async def api(request: web.Request) -> web.Response:
        received.append(request.headers.get("X-API-Key", ""))
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/{tail:.*}", api)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    # Kubernetes' layout: token -> ..data/token, ..data -> ..2024_01 (a directory)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "token").write_text("key-one\n")
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "token").write_text("key-two\n")
    os.symlink("v1", tmp_path / "..data")
    os.symlink("..data/token", tmp_path / "token")
    try:
        proxy = await start_proxy(
            {
                "listen": "127.0.0.1:0",
                "admin": {"listen": "127.0.0.1:0"},
                "upstreams": [
                    {
                        "name": "v3",
                        "url": f"http://127.0.0.1:{runner.addresses[0][1]}",
                        "auth": {"type": "static", "token_file": str(tmp_path / "token")},
                        "inject": {"header": "X-API-Key", "format": "{token}"},
                    }
                ],
            }
        )
        await _get(http, proxy, "/a")
        os.symlink("v2", tmp_path / "..data.new")
        os.replace(tmp_path / "..data.new", tmp_path / "..data")
        await run_for(clock, proxy, 15, 1)
        await _get(http, proxy, "/b")
        assert received == ["key-one", "key-two"]
    finally:
        await runner.cleanup()


async def test_auth_type_none_forwards_without_credentials(start_proxy, fake, fake_url, http):
    proxy = await start_proxy(
        {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0"},
            "upstreams": [{"name": "public", "url": fake_url, "auth": {"type": "none"}}],
        }
    )
    async with http.get(proxy.addresses["proxy"] + "/user/") as resp:
        assert resp.status == 401  # the fake wants a token; the proxy sent none
    assert fake.tokens_seen == []
    assert proxy.readiness() == []


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def _tls_upstream(ca: trustme.CA, *, require_client_cert: bool = False):
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"auth": request.headers.get("Authorization")})

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(ctx)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
    return runner, f"https://127.0.0.1:{runner.addresses[0][1]}"


def _static(url: str, **tls) -> dict:
    up = {"name": "tls", "url": url, "auth": {"type": "static", "token": "t0k3n"}}
    if tls:
        up["tls"] = tls
    return {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "upstreams": [up]}


async def test_an_upstream_with_a_private_ca_works_with_ca_file(ca, tmp_path, start_proxy, http):
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    runner, url = await _tls_upstream(ca)
    try:
        proxy = await start_proxy(_static(url, ca_file=str(ca_file)))
        status, body = await _get(http, proxy, "/x")
        assert (status, body["auth"]) == (200, "Bearer t0k3n")
    finally:
        await runner.cleanup()


async def test_a_certificate_that_does_not_verify_gives_502_upstream_tls_error(
    ca, start_proxy, http
):
    runner, url = await _tls_upstream(ca)
    try:
        proxy = await start_proxy(_static(url))
        async with http.get(proxy.addresses["proxy"] + "/x") as resp:
            assert resp.status == 502
            assert resp.headers["X-Royalti-Proxy-Error"] == "UPSTREAM_TLS_ERROR"
            assert "t0k3n" not in await resp.text()
    finally:
        await runner.cleanup()


async def test_mutual_tls_presents_the_configured_client_certificate(
    ca, tmp_path, start_proxy, http
):
    ca_file, cert_file = tmp_path / "ca.pem", tmp_path / "client.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("proxy.client")
    client.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    runner, url = await _tls_upstream(ca, require_client_cert=True)
    try:
        proxy = await start_proxy(_static(url, ca_file=str(ca_file)))
        async with http.get(proxy.addresses["proxy"] + "/x") as resp:
            assert resp.status == 502  # no client certificate: the handshake fails
        proxy = await start_proxy(_static(url, ca_file=str(ca_file), cert_file=str(cert_file)))
        status, body = await _get(http, proxy, "/x")
        assert (status, body["auth"]) == (200, "Bearer t0k3n")
    finally:
        await runner.cleanup()


def test_default_tls_settings_share_aiohttps_verified_context_and_others_get_their_own(
    ca, tmp_path
):
    """The defaults are aiohttp's own verified context (``True``), built once at its import,
    not a new one per upstream; any setting of its own gives an upstream a context of its own
    (the handshakes themselves: the tests above)."""
    from proxy.config import TLSSettings
    from proxy.upstreams import ssl_context

    assert ssl_context(TLSSettings()) is True
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    for own in (
        ssl_context(TLSSettings(ca_file=str(ca_file))),
        ssl_context(TLSSettings(), extra_ca=str(ca_file)),
    ):
        assert isinstance(own, ssl.SSLContext)
        assert own.verify_mode == ssl.CERT_REQUIRED and own.check_hostname
    off = ssl_context(TLSSettings(verify=False))
    assert isinstance(off, ssl.SSLContext) and off.verify_mode == ssl.CERT_NONE
