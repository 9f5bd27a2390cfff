"""WebSocket through the proxy: the credential on the handshake, messages both ways, close codes
passed on, a rejected token replayed once on the handshake."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from tests.conftest import WS, royalti_config


@pytest.fixture
async def ws_upstream(fake):
    """A WebSocket endpoint that checks the bearer token against the fake Royalti API."""
    state: dict = {"auth": [], "closed_with": []}

    async def handler(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        state["auth"].append(auth)
        if auth.removeprefix("Bearer ") in fake.revoked_access or not auth.startswith("Bearer "):
            return web.Response(status=401)
        ws = web.WebSocketResponse(protocols=("socketio",))
        await ws.prepare(request)
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                if msg.data == "bye":
                    await ws.close(code=4001, message=b"bye")
                    break
                await ws.send_str(f"echo:{msg.data}")
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
            else:
                if msg.type is WSMsgType.CLOSE:
                    state["closed_with"].append(msg.data)  # the code in the client's frame
                break
        return ws

    app = web.Application()
    app.router.add_get("/socket.io/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield state
    await runner.cleanup()


async def _proxy(start_proxy, fake_url, ws_upstream):
    config = royalti_config(fake_url, default_workspace=WS[0])
    up = config["upstreams"][0]
    config["upstreams"].append(
        {
            "name": "rt",
            "url": ws_upstream["url"],
            "path_prefix": "/rt",
            "auth": {**up["auth"], "auth_url": fake_url},  # tokens from Royalti's API host
        }
    )
    return await start_proxy(config)


async def test_messages_flow_both_ways_with_the_token_injected_on_the_handshake(
    start_proxy, fake, fake_url, ws_upstream, http
):
    proxy = await _proxy(start_proxy, fake_url, ws_upstream)
    url = proxy.addresses["proxy"] + "/rt/socket.io/?EIO=4&transport=websocket"
    async with http.ws_connect(url, protocols=("socketio",)) as ws:
        assert ws.protocol == "socketio"
        await ws.send_str("hello")
        assert (await ws.receive_str()) == "echo:hello"
        await ws.send_bytes(b"\x01\x02\x03")
        assert (await ws.receive_bytes()) == b"\x03\x02\x01"
    assert ws_upstream["auth"][0].startswith("Bearer ey")


async def test_the_upstreams_close_code_reaches_the_client(
    start_proxy, fake, fake_url, ws_upstream, http
):
    proxy = await _proxy(start_proxy, fake_url, ws_upstream)
    async with http.ws_connect(proxy.addresses["proxy"] + "/rt/socket.io/") as ws:
        await ws.send_str("bye")
        msg = await ws.receive()
        assert msg.type is WSMsgType.CLOSE
        assert ws.close_code == 4001


async def test_the_clients_close_code_reaches_the_upstream(
    start_proxy, fake, fake_url, ws_upstream, http
):
    proxy = await _proxy(start_proxy, fake_url, ws_upstream)
    async with http.ws_connect(proxy.addresses["proxy"] + "/rt/socket.io/") as ws:
        await ws.send_str("ping")
        await ws.receive_str()
        await ws.close(code=4100)
    for _ in range(200):  # the upstream handler finishes asynchronously (real I/O)
        if ws_upstream["closed_with"]:
            break
        await asyncio.sleep(0.01)
    assert ws_upstream["closed_with"] == [4100]


async def test_a_token_rejected_on_the_handshake_is_renewed_and_the_upgrade_retried_once(
    start_proxy, fake, fake_url, ws_upstream, http
):
    proxy = await _proxy(start_proxy, fake_url, ws_upstream)
    async with http.ws_connect(proxy.addresses["proxy"] + "/rt/socket.io/") as ws:
        await ws.close()
    fake.revoke_access_token(ws_upstream["auth"][-1].removeprefix("Bearer "))
    async with http.ws_connect(proxy.addresses["proxy"] + "/rt/socket.io/") as ws:
        await ws.send_str("again")
        assert (await ws.receive_str()) == "echo:again"
    assert len(ws_upstream["auth"]) == 3
    assert ws_upstream["auth"][1] != ws_upstream["auth"][2]
    assert proxy.registry.get_sample_value("royalti_proxy_replays_total", {"upstream": "rt"}) == 1


async def test_an_upgrade_the_upstream_refuses_reaches_the_client_as_its_status(
    start_proxy, fake, fake_url, ws_upstream, http
):
    proxy = await _proxy(start_proxy, fake_url, ws_upstream)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(proxy.addresses["proxy"] + "/rt/no-such-socket")
    assert info.value.status == 404
