"""Reload: SIGHUP or a changed secret file applies a new configuration without dropping requests
in flight; a broken configuration is rejected and the running one kept."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging

import pytest
import yaml

from proxy.app import Proxy
from proxy.config import build, load
from tests.conftest import PASSWORD, WS, royalti_config


@pytest.fixture
async def reloadable(clock, fake_url, tmp_path):
    """A proxy started from a YAML file with the password in a secret file, reloadable."""
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    data = royalti_config(fake_url, default_workspace=WS[0])
    auth = data["upstreams"][0]["auth"]
    del auth["password"]
    auth["password_file"] = str(password)
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(data))
    proxy = Proxy(load(str(path), {}), clock=clock, reload_source=lambda: load(str(path), {}))
    await proxy.start()
    await proxy.managers["royalti"].wait_idle()
    yield proxy, path, password, data
    await proxy.stop()


async def _get(http, proxy, path="/user/"):
    async with http.get(proxy.addresses["proxy"] + path) as resp:
        return resp.status


async def _proxy_error(http, proxy, path):
    async with http.get(proxy.addresses["proxy"] + path) as resp:
        return resp.status, resp.headers.get("X-Royalti-Proxy-Error")


async def test_reloading_an_unchanged_configuration_keeps_tokens_and_logs_in_no_more(
    reloadable, fake, http
):
    proxy, _, _, _ = reloadable
    manager = proxy.managers["royalti"]
    assert await proxy.reload() is True
    assert proxy.managers["royalti"] is manager
    assert await _get(http, proxy) == 200
    assert fake.login_calls == 1


async def test_a_broken_new_configuration_is_rejected_and_the_running_one_kept(
    reloadable, fake, http, caplog
):
    proxy, path, _, _ = reloadable
    path.write_text("upstreams: [{name: x}]\n")
    with caplog.at_level(logging.ERROR, logger="proxy"):
        assert await proxy.reload() is False
    assert any(getattr(r, "event", None) == "reload_rejected" for r in caplog.records)
    assert await _get(http, proxy) == 200
    assert proxy.readiness() == []


async def test_a_changed_secret_file_is_noticed_and_reloads_credentials(
    clock, reloadable, fake, http
):
    proxy, _, password, _ = reloadable
    fake.users["ops@example.com"] = "new-password"
    password.write_text("new-password\n")
    await clock.advance(proxy.config.reload_poll + 0.1)
    for _ in range(100):  # the reload does real I/O (a new login): wait for it, not for time
        if fake.login_calls == 2:
            break
        await asyncio.sleep(0.01)
    await proxy.managers["royalti"].wait_idle()
    assert fake.login_calls == 2
    assert await _get(http, proxy) == 200


async def test_a_request_in_flight_during_a_reload_completes_on_the_old_upstream(
    reloadable, fake, http
):
    proxy, path, _, data = reloadable
    fake.sse_gate = asyncio.Queue()
    async with http.post(proxy.addresses["proxy"] + "/ai/chat?n=2") as resp:
        assert resp.status == 200
        changed = copy.deepcopy(data)
        changed["upstreams"][0]["replay_max_body"] = "2MiB"  # a change: new upstream objects
        path.write_text(yaml.safe_dump(changed))
        assert await proxy.reload() is True
        for _ in range(2):
            fake.sse_gate.put_nowait(None)
        body = await resp.read()
    assert body.count(b'data: {"index"') == 2
    assert b"event: done" in body
    assert await _get(http, proxy) == 200


async def test_a_new_upstream_appears_and_a_removed_one_disappears_on_reload(
    reloadable, fake_url, http
):
    proxy, path, _, data = reloadable
    changed = copy.deepcopy(data)
    changed["upstreams"].append(
        {
            "name": "extra",
            "url": fake_url,
            "path_prefix": "/extra",
            "auth": {"type": "royalti", "api_key": "RWAK-demo-key"},
        }
    )
    path.write_text(yaml.safe_dump(changed))
    assert await proxy.reload() is True
    assert await _get(http, proxy, "/extra/user/") == 200
    path.write_text(yaml.safe_dump(data))
    assert await proxy.reload() is True
    # Now a path under Royalti's "/" route: the fake itself answers 404 for it.
    assert await _proxy_error(http, proxy, "/extra/user/") == (404, None)


async def test_a_listen_address_change_is_ignored_with_a_warning(reloadable, caplog):
    proxy, _, _, data = reloadable
    changed = copy.deepcopy(data)
    changed["listen"] = "127.0.0.1:1"
    with caplog.at_level(logging.WARNING, logger="proxy"):
        assert await proxy.reload(build(changed, {}, source="test")) is True
    assert any(getattr(r, "event", None) == "reload_ignored" for r in caplog.records)
    assert str(proxy.config.listen) != "127.0.0.1:1"  # the running address is what is reported


async def test_an_event_loop_change_is_ignored_with_a_warning(reloadable, caplog):
    proxy, _, _, data = reloadable
    # Replaced rather than loaded: `event_loop: uvloop` loads only where uvloop is installed.
    changed = dataclasses.replace(build(data, {}, source="test"), event_loop="uvloop")
    with caplog.at_level(logging.WARNING, logger="proxy"):
        assert await proxy.reload(changed) is True
    ignored = [r for r in caplog.records if getattr(r, "event", None) == "reload_ignored"]
    assert [getattr(r, "key", None) for r in ignored] == ["event_loop"]
    assert proxy.config.event_loop == "asyncio"  # the running loop is what is reported
