"""The admin listener: liveness, readiness, token status, metrics and the quit endpoint, all read
over HTTP from the real proxy in front of the fake Royalti API (or a tiny upstream of the test's
own), with token time driven by the fake clock."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from proxy.app import Proxy
from proxy.clock import FakeClock
from proxy.errors import ERROR_HEADER
from proxy.fakes.royalti import FakeRoyalti
from tests.binaries import require_binary
from tests.conftest import PASSWORD, WS, ProxyFactory, Serve, royalti_config, run_for

JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")
HEX8 = re.compile(r"[0-9a-f]{8}")
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


# -- helpers ----------------------------------------------------------------------------------


def with_default(url: str, **auth: Any) -> dict[str, Any]:
    """The Royalti upstream with a default workspace, so readiness has a token to wait for."""
    return royalti_config(url, default_workspace=WS[0], **auth)


def upstream_config(url: str, auth: dict[str, Any]) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "upstreams": [{"name": "own", "url": url, "auth": auth}],
    }


async def admin_get(
    http: aiohttp.ClientSession, proxy: Proxy, path: str, **kwargs: Any
) -> tuple[int, str, CIMultiDictProxy[str]]:
    async with http.get(proxy.addresses["admin"] + path, **kwargs) as resp:
        return resp.status, await resp.text(), resp.headers


async def admin_json(http: aiohttp.ClientSession, proxy: Proxy, path: str) -> tuple[int, Any]:
    async with http.get(proxy.addresses["admin"] + path) as resp:
        return resp.status, await resp.json()


async def call(
    http: aiohttp.ClientSession, proxy: Proxy, path: str = "/user/", workspace: str | None = None
) -> int:
    headers = {"X-Royalti-Workspace": workspace} if workspace else {}
    async with http.get(proxy.addresses["proxy"] + path, headers=headers) as resp:
        await resp.read()
        return resp.status


def sample(proxy: Proxy, name: str, **labels: str) -> float | None:
    return proxy.registry.get_sample_value(name, labels)


def bearer(authorization: str) -> str:
    return authorization.removeprefix("Bearer ")


async def ready_proxy(start_proxy: ProxyFactory, data: dict[str, Any]) -> Proxy:
    proxy = await start_proxy(data)
    await proxy.managers["royalti"].wait_idle()
    return proxy


# -- liveness and readiness -------------------------------------------------------------------


async def test_livez_answers_200_while_the_event_loop_runs(
    start_proxy: ProxyFactory, fake_url: str, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(with_default(fake_url))
    status, body = await admin_json(http, proxy, "/livez")
    assert status == 200
    assert body == {"status": "alive"}


async def test_readyz_is_200_once_the_default_workspace_token_is_fetched_without_any_request(
    start_proxy: ProxyFactory, fake: FakeRoyalti, fake_url: str, http: aiohttp.ClientSession
) -> None:
    proxy = await ready_proxy(start_proxy, with_default(fake_url))
    status, body = await admin_json(http, proxy, "/readyz")
    assert status == 200
    assert body == {"status": "ready", "reasons": []}
    assert fake.authtoken_calls[WS[0]] == 1
    assert fake.api_calls == 0  # nobody sent a request: the token was fetched at start-up


async def test_readyz_is_503_naming_the_upstream_and_last_error_while_the_token_endpoint_fails(
    start_proxy: ProxyFactory,
    fake: FakeRoyalti,
    fake_url: str,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    fake.authtoken_failures = [(500, None)] * 1000
    proxy = await ready_proxy(start_proxy, with_default(fake_url))
    status, body = await admin_json(http, proxy, "/readyz")
    assert status == 503
    assert body["status"] == "not ready"
    [reason] = body["reasons"]
    assert "upstream royalti" in reason
    assert WS[0] in reason
    assert "HTTP_500" in reason
    assert sample(proxy, "royalti_proxy_ready") == 0.0

    fake.authtoken_failures.clear()
    await run_for(clock, proxy, 400, 5)
    status, body = await admin_json(http, proxy, "/readyz")
    assert (status, body) == (200, {"status": "ready", "reasons": []})
    assert sample(proxy, "royalti_proxy_ready") == 1.0


async def test_readyz_with_a_static_token_is_200_at_once(
    start_proxy: ProxyFactory, serve: Serve, http: aiohttp.ClientSession
) -> None:
    url = await serve(web.Application())
    proxy = await start_proxy(upstream_config(url, {"type": "static", "token": "t"}))
    status, body = await admin_json(http, proxy, "/readyz")
    assert (status, body) == (200, {"status": "ready", "reasons": []})


async def test_readyz_without_authentication_is_always_200(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    # Nothing listens at the upstream: readiness is about credentials, not upstream health.
    proxy = await start_proxy(upstream_config("http://127.0.0.1:9", {"type": "none"}))
    status, body = await admin_json(http, proxy, "/readyz")
    assert (status, body) == (200, {"status": "ready", "reasons": []})


async def test_readyz_is_503_shutting_down_while_a_slow_request_drains_and_that_request_completes(
    start_proxy: ProxyFactory, serve: Serve, http: aiohttp.ClientSession
) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 6
        await resp.prepare(request)
        await resp.write(b"abc")
        started.set()
        await release.wait()
        await resp.write(b"def")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/slow", slow)
    url = await serve(app)
    proxy = await start_proxy(upstream_config(url, {"type": "static", "token": "t"}))

    async def download() -> bytes:
        async with http.get(proxy.addresses["proxy"] + "/slow") as resp:
            assert resp.status == 200
            return await resp.read()

    in_flight = asyncio.ensure_future(download())
    await asyncio.wait_for(started.wait(), 10)
    stopping = asyncio.ensure_future(proxy.stop())
    try:
        status, body = await admin_json(http, proxy, "/readyz")
        assert (status, body) == (503, {"status": "not ready", "reasons": ["shutting down"]})
        assert sample(proxy, "royalti_proxy_ready") == 0.0
        assert not in_flight.done()
    finally:
        release.set()
    assert await asyncio.wait_for(in_flight, 10) == b"abcdef"
    await asyncio.wait_for(stopping, 10)


async def test_readyz_stays_200_after_traffic_to_more_workspaces_than_the_cache_holds(
    start_proxy: ProxyFactory, fake_url: str, http: aiohttp.ClientSession
) -> None:
    data = with_default(fake_url)
    data["tokens"] = {"max_entries": 2}
    proxy = await ready_proxy(start_proxy, data)
    assert await call(http, proxy, workspace=WS[1]) == 200
    assert await call(http, proxy, workspace=WS[2]) == 200
    status, body = await admin_json(http, proxy, "/readyz")
    assert (status, body) == (200, {"status": "ready", "reasons": []})


# -- token status -----------------------------------------------------------------------------


async def test_tokens_shows_every_workspace_state_and_the_credential_but_no_secret(
    start_proxy: ProxyFactory,
    fake: FakeRoyalti,
    fake_url: str,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    proxy = await ready_proxy(start_proxy, with_default(fake_url))
    assert await call(http, proxy) == 200
    assert await call(http, proxy, workspace=WS[1]) == 200
    fake.revoke_access_token(bearer(fake.tokens_seen[-1]))
    assert await call(http, proxy, workspace=WS[1]) == 200  # replayed with a fresh token
    await run_for(clock, proxy, 100, 5)

    status, raw, headers = await admin_get(http, proxy, "/tokens")
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    for seen in fake.tokens_seen:
        assert bearer(seen) not in raw
    assert PASSWORD not in raw
    assert not JWT.search(raw)

    _, doc = await admin_json(http, proxy, "/tokens")
    assert doc["ready"] is True
    [upstream] = doc["upstreams"]
    assert (upstream["name"], upstream["auth"]) == ("royalti", "royalti")
    by_ws = {t["workspace"]: t for t in upstream["tokens"]}
    assert set(by_ws) == {WS[0], WS[1]}
    for entry in by_ws.values():
        assert entry["state"] == "valid"
        assert HEX8.fullmatch(entry["fingerprint"])
        assert entry["expires_in"] == pytest.approx(599 - 100, abs=2)
        assert entry["next_refresh_in"] < entry["expires_in"]
        assert entry["consecutive_failures"] == 0
        assert entry["last_error"] is None
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["expires_at"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["fetched_at"])
    assert by_ws[WS[0]]["pinned"] is True
    assert by_ws[WS[1]]["pinned"] is False
    credential = upstream["credential"]
    assert credential["kind"] == "refresh_token"
    assert HEX8.fullmatch(credential["fingerprint"])
    assert credential["renewable"] is True
    assert credential["last_error"] is None
    assert credential["expires_at"] is not None


async def test_tokens_reports_failures_and_the_last_error_code_of_a_failing_workspace(
    start_proxy: ProxyFactory,
    fake: FakeRoyalti,
    fake_url: str,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    proxy = await ready_proxy(start_proxy, with_default(fake_url))
    fake.authtoken_failures = [(503, None)] * 1000
    await run_for(clock, proxy, 520, 5)  # past the refresh point, not yet past expiry
    _, doc = await admin_json(http, proxy, "/tokens")
    [entry] = doc["upstreams"][0]["tokens"]
    assert entry["state"] == "failing"
    assert entry["consecutive_failures"] >= 1
    assert entry["last_error"] == "HTTP_503"
    assert entry["expires_in"] > 0


# -- metrics ----------------------------------------------------------------------------------


async def test_metrics_count_requests_by_upstream_method_and_code(
    start_proxy: ProxyFactory, fake_url: str, http: aiohttp.ClientSession
) -> None:
    proxy = await ready_proxy(start_proxy, with_default(fake_url))
    for _ in range(5):
        assert await call(http, proxy) == 200
    assert await call(http, proxy, "/status/404") == 404

    status, text, headers = await admin_get(http, proxy, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    parsed = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    key = (("code", "200"), ("method", "GET"), ("upstream", "royalti"))
    assert parsed[("royalti_proxy_requests_total", key)] == 5
    assert (
        sample(proxy, "royalti_proxy_requests_total", upstream="royalti", method="GET", code="404")
        == 1
    )
    assert sample(proxy, "royalti_proxy_upstream_duration_seconds_count", upstream="royalti") == 6
    assert sample(proxy, "royalti_proxy_requests_in_flight") == 0


async def test_metrics_count_token_fetches_by_kind_and_outcome(
    start_proxy: ProxyFactory,
    fake: FakeRoyalti,
    fake_url: str,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    fake.login_failures = [(503, None)]
    proxy = await ready_proxy(start_proxy, with_default(fake_url))
    await run_for(clock, proxy, 30, 1)  # the login backs off, then succeeds
    fake.authtoken_failures = [(500, None)]
    assert await call(http, proxy, workspace=WS[1]) == 503  # TOKEN_UNAVAILABLE

    def fetches(kind: str, outcome: str) -> float | None:
        return sample(
            proxy,
            "royalti_proxy_token_fetches_total",
            upstream="royalti",
            kind=kind,
            outcome=outcome,
        )

    assert fetches("login", "HTTP_503") == 1
    assert fetches("login", "success") == 1
    assert fetches("access", "success") == 1
    assert fetches("access", "HTTP_500") == 1
    assert (
        sample(
            proxy,
            "royalti_proxy_token_fetch_duration_seconds_count",
            upstream="royalti",
            kind="access",
        )
        == 2
    )
    assert sample(proxy, "royalti_proxy_errors_total", code="TOKEN_UNAVAILABLE") == 1


async def test_metrics_count_cache_hits_misses_and_waits(
    start_proxy: ProxyFactory, fake_url: str, http: aiohttp.ClientSession
) -> None:
    proxy = await ready_proxy(start_proxy, with_default(fake_url))

    def lookups(result: str) -> float | None:
        return sample(
            proxy, "royalti_proxy_token_cache_requests_total", upstream="royalti", result=result
        )

    for _ in range(3):
        assert await call(http, proxy) == 200
    assert (lookups("hit"), lookups("miss")) == (3, 0)
    assert sample(proxy, "royalti_proxy_token_waits_total", upstream="royalti") == 0

    assert await call(http, proxy, workspace=WS[1]) == 200  # nobody fetched this one yet
    assert (lookups("hit"), lookups("miss")) == (3, 1)
    assert sample(proxy, "royalti_proxy_token_waits_total", upstream="royalti") == 1


async def test_metrics_count_a_replay_after_the_upstream_rejects_the_cached_token(
    start_proxy: ProxyFactory, fake: FakeRoyalti, fake_url: str, http: aiohttp.ClientSession
) -> None:
    proxy = await ready_proxy(start_proxy, with_default(fake_url))
    assert await call(http, proxy) == 200
    assert sample(proxy, "royalti_proxy_replays_total", upstream="royalti") == 0
    fake.revoke_access_token(bearer(fake.tokens_seen[-1]))
    assert await call(http, proxy) == 200
    assert fake.unauthorized == 1
    assert sample(proxy, "royalti_proxy_replays_total", upstream="royalti") == 1


async def test_metrics_count_errors_the_proxy_answered_itself_by_code(
    start_proxy: ProxyFactory, fake_url: str, http: aiohttp.ClientSession
) -> None:
    proxy = await ready_proxy(
        start_proxy, with_default(fake_url, allowed_workspaces=[WS[0], WS[1]])
    )
    async with http.get(
        proxy.addresses["proxy"] + "/user/", headers={"X-Royalti-Workspace": WS[3]}
    ) as resp:
        assert resp.status == 403
        assert resp.headers[ERROR_HEADER] == "WORKSPACE_NOT_ALLOWED"
    assert await call(http, proxy, workspace=WS[2]) == 403
    assert sample(proxy, "royalti_proxy_errors_total", code="WORKSPACE_NOT_ALLOWED") == 2


async def test_metrics_export_token_and_credential_expiry_as_unix_times(
    start_proxy: ProxyFactory, fake_url: str, clock: FakeClock
) -> None:
    proxy = await ready_proxy(start_proxy, with_default(fake_url))
    expiry = sample(
        proxy, "royalti_proxy_token_expiry_timestamp_seconds", upstream="royalti", workspace=WS[0]
    )
    assert expiry == pytest.approx(clock.wall() + 600, abs=2)
    credential = sample(
        proxy,
        "royalti_proxy_credential_expiry_timestamp_seconds",
        upstream="royalti",
        kind="refresh_token",
    )
    assert credential == pytest.approx(clock.wall() + 3600, abs=2)
    assert sample(proxy, "royalti_proxy_token_valid", upstream="royalti", workspace=WS[0]) == 1
    assert (
        sample(
            proxy, "royalti_proxy_token_consecutive_failures", upstream="royalti", workspace=WS[0]
        )
        == 0
    )


async def test_metrics_export_build_info_and_readiness(
    start_proxy: ProxyFactory, fake_url: str
) -> None:
    proxy = await ready_proxy(start_proxy, with_default(fake_url))
    families = {f.name: f for f in proxy.registry.collect()}
    [build] = families["royalti_proxy_build_info"].samples
    assert build.value == 1
    assert build.labels["version"] == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", build.labels["python_version"])
    assert sample(proxy, "royalti_proxy_ready") == 1


async def test_metrics_in_openmetrics_format_when_asked_for_it(
    start_proxy: ProxyFactory, fake_url: str, http: aiohttp.ClientSession
) -> None:
    proxy = await ready_proxy(start_proxy, with_default(fake_url))
    assert await call(http, proxy) == 200
    status, text, headers = await admin_get(
        http, proxy, "/metrics", headers={"Accept": OPENMETRICS}
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parse_openmetrics(text)  # type: ignore[no-untyped-call]
        for s in family.samples
    }
    key = (("code", "200"), ("method", "GET"), ("upstream", "royalti"))
    assert values[("royalti_proxy_requests_total", key)] == 1


async def test_workspace_labels_are_bounded_to_the_configured_number_plus_other(
    start_proxy: ProxyFactory, fake_url: str, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    data = with_default(fake_url)
    data["admin"] = {"listen": "127.0.0.1:0", "metrics_max_workspaces": 2}
    proxy = await ready_proxy(start_proxy, data)
    for ws in WS[1:]:
        assert await call(http, proxy, workspace=ws) == 200
        await run_for(clock, proxy, 1, 1)  # so that the workspaces differ in recency
    families = {f.name: f for f in proxy.registry.collect()}
    for name in (
        "royalti_proxy_token_expiry_timestamp_seconds",
        "royalti_proxy_token_valid",
        "royalti_proxy_token_consecutive_failures",
    ):
        workspaces = [s.labels["workspace"] for s in families[name].samples]
        named = [w for w in workspaces if w != "other"]
        assert len(named) == 2, name
        assert WS[0] in named, name  # the pinned default workspace is always named
        assert WS[3] in named, name  # then the most recently used
        assert workspaces.count("other") == 1, name
    assert sample(proxy, "royalti_proxy_token_valid", upstream="royalti", workspace="other") == 1


async def test_promtool_finds_nothing_to_complain_about_in_the_metrics(
    start_proxy: ProxyFactory, fake: FakeRoyalti, fake_url: str, http: aiohttp.ClientSession
) -> None:
    promtool = require_binary("promtool")
    proxy = await ready_proxy(
        start_proxy, with_default(fake_url, allowed_workspaces=[WS[0], WS[1]])
    )
    assert await call(http, proxy) == 200
    assert await call(http, proxy, "/status/500") == 500
    assert await call(http, proxy, workspace=WS[3]) == 403
    fake.authtoken_failures = [(500, None)]
    assert await call(http, proxy, workspace=WS[1]) == 503
    fake.revoke_access_token(bearer(fake.tokens_seen[-1]))
    assert await call(http, proxy) == 200
    assert sample(proxy, "royalti_proxy_replays_total", upstream="royalti") == 1

    _, text, _ = await admin_get(http, proxy, "/metrics")
    proc = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(text.encode()), 30)
    assert (proc.returncode, out.decode()) == (0, "")


# -- quit -------------------------------------------------------------------------------------


async def test_quitquitquit_is_404_in_the_error_envelope_when_not_enabled(
    start_proxy: ProxyFactory, fake_url: str, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(with_default(fake_url))
    async with http.post(proxy.addresses["admin"] + "/quitquitquit") as resp:
        assert resp.status == 404
        assert resp.headers[ERROR_HEADER] == "QUIT_DISABLED"
        body = await resp.json()
    assert body["success"] is False
    assert body["error"]["code"] == "QUIT_DISABLED"
    assert not proxy.quit.is_set()


async def test_quitquitquit_is_202_and_asks_the_process_to_quit_when_enabled(
    start_proxy: ProxyFactory, fake_url: str, http: aiohttp.ClientSession
) -> None:
    data = with_default(fake_url)
    data["admin"] = {"listen": "127.0.0.1:0", "enable_quit": True}
    proxy = await start_proxy(data)
    async with http.post(proxy.addresses["admin"] + "/quitquitquit") as resp:
        assert resp.status == 202
        assert await resp.json() == {"status": "shutting down"}
    assert proxy.quit.is_set()
