"""Structured logs: one JSON object per line (or key=value text), token lifecycle events carrying
their upstream, workspace and fingerprint, and never a secret anywhere the proxy writes: not in a
log line, the token-status document, the metrics or an error body a client gets."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from proxy import logs
from proxy.app import Proxy
from proxy.clock import FakeClock
from proxy.errors import ERROR_HEADER
from proxy.fakes.oauth2 import FakeOAuth2, start_fake_oauth2
from proxy.fakes.royalti import FakeRoyalti
from tests.conftest import PASSWORD, WS, ProxyFactory, royalti_config, run_for

JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")
HEX8 = re.compile(r"[0-9a-f]{8}")
TOKEN_EVENTS = ("token_fetched", "token_renewed", "token_fetch_failed", "token_expired")

VBOT_CLIENT = "vbot-client"
VBOT_SECRET = "vbot-client-secret-Zq81"
VBOT_USER = "vbot-user"
VBOT_PASSWORD = "vbot-password-Xr42"


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def capture_logs() -> Iterator[Callable[..., io.StringIO]]:
    """``capture_logs(fmt, level)``: the proxy's logging set up to write into a buffer; the root
    logger's handlers and levels are put back afterwards."""
    root = logging.getLogger()
    access = logging.getLogger("aiohttp.access")
    levels = (root.level, access.level)
    streams: list[io.StringIO] = []

    def capture(fmt: str = "json", level: str = "INFO") -> io.StringIO:
        stream = io.StringIO()
        logs.setup(fmt, level, stream=stream)
        streams.append(stream)
        return stream

    yield capture
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and handler.stream in streams:
            root.removeHandler(handler)
    root.setLevel(levels[0])
    access.setLevel(levels[1])


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = stream.getvalue().splitlines()
    assert lines, "nothing was logged"
    records = [json.loads(line) for line in lines]
    for line, record in zip(lines, records, strict=True):
        assert isinstance(record, dict), line
        for key in ("time", "level", "event", "message"):
            assert key in record, line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), line
    return records


def events(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == name]


async def get(
    http: aiohttp.ClientSession, proxy: Proxy, path: str, workspace: str | None = None
) -> tuple[int, bytes, dict[str, str]]:
    headers = {"X-Royalti-Workspace": workspace} if workspace else {}
    async with http.get(proxy.addresses["proxy"] + path, headers=headers) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


# -- the format -------------------------------------------------------------------------------


async def test_json_logs_are_one_object_per_line_with_token_lifecycle_fields(
    capture_logs: Callable[..., io.StringIO],
    start_proxy: ProxyFactory,
    fake: FakeRoyalti,
    fake_url: str,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    stream = capture_logs("json", "INFO")
    data = royalti_config(fake_url, default_workspace=WS[0])
    # Backoff capped well under the failure phase, so the token's expiry is seen within it.
    data["tokens"] = {"idle_timeout": "700s", "max_backoff": "20s"}
    proxy = await start_proxy(data)
    await proxy.managers["royalti"].wait_idle()
    assert (await get(http, proxy, "/user/", WS[1]))[0] == 200
    await run_for(clock, proxy, 1000, 5)  # both renewed once; WS[1], unused, then drops out
    fake.authtoken_failures = [(500, None)] * 1000
    await run_for(clock, proxy, 700, 5)  # renewals fail until the token runs out
    fake.authtoken_failures.clear()
    await run_for(clock, proxy, 400, 5)  # and it is fetched again

    records = json_lines(stream)
    [login, *_] = events(records, "login")
    assert login["upstream"] == "royalti"
    assert HEX8.fullmatch(login["fingerprint"])
    assert login["level"] == "info"
    for name in TOKEN_EVENTS:
        found = events(records, name)
        assert found, f"no {name} event"
        for record in found:
            assert record["upstream"] == "royalti", record
            assert record["workspace"] in WS, record
            assert "fingerprint" in record, record
    fetched = events(records, "token_fetched")
    assert {r["workspace"] for r in fetched} == {WS[0], WS[1]}
    assert all(HEX8.fullmatch(r["fingerprint"]) for r in fetched)
    assert all(r["expires_in"] == pytest.approx(599, abs=1) for r in fetched)
    assert all(HEX8.fullmatch(r["fingerprint"]) for r in events(records, "token_renewed"))
    failed = events(records, "token_fetch_failed")
    assert all(r["level"] == "warning" and r["error_code"] == "HTTP_500" for r in failed)
    assert [r["consecutive_failures"] for r in failed][:3] == [1, 2, 3]
    [expired] = events(records, "token_expired")
    assert (expired["workspace"], expired["level"]) == (WS[0], "warning")
    assert HEX8.fullmatch(expired["fingerprint"])
    [evicted] = events(records, "token_evicted")
    assert (evicted["workspace"], evicted["reason"]) == (WS[1], "idle")
    assert HEX8.fullmatch(evicted["fingerprint"])
    started = events(records, "started")
    assert started[0]["admin"] == proxy.addresses["admin"]


async def test_text_logs_are_one_readable_line_per_event_with_key_value_fields(
    capture_logs: Callable[..., io.StringIO],
    start_proxy: ProxyFactory,
    fake_url: str,
) -> None:
    stream = capture_logs("text", "INFO")
    proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
    await proxy.managers["royalti"].wait_idle()
    lines = stream.getvalue().splitlines()
    [fetched] = [line for line in lines if " token_fetched " in line]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z info {4}token_fetched ", fetched)
    assert "upstream=royalti" in fetched
    assert f"workspace={WS[0]}" in fetched
    assert re.search(r"fingerprint=[0-9a-f]{8}\b", fetched)
    assert any(" login " in line for line in lines)
    assert not any(line.lstrip().startswith("{") for line in lines)


# -- the leak test ----------------------------------------------------------------------------


@dataclass
class Secrets:
    """Every secret value of a run, and what would betray it if only part of it leaked."""

    values: set[str] = field(default_factory=set)

    def add(self, *values: str) -> None:
        self.values.update(v for v in values if v)

    def needles(self) -> set[str]:
        out: set[str] = set()
        for value in self.values:
            out.add(value)
            parts = value.split(".")
            if len(parts) == 3 and value.startswith("eyJ"):
                out.update(parts[1:])  # a JWT's claims and signature, each on its own
            elif len(value) >= 24:
                out.update((value[:12], value[-12:]))  # a truncated opaque token
        return out


def record_issued(fake: FakeRoyalti, into: list[str], name: str) -> None:
    """Wrap one of the fake's token minting methods so every token it issues is kept."""
    mint = getattr(fake, name)

    def wrapped(*args: Any, **kwargs: Any) -> str:
        token: str = mint(*args, **kwargs)
        into.append(token)
        return token

    setattr(fake, name, wrapped)


@pytest.fixture
async def vbot(clock: FakeClock) -> AsyncIterator[tuple[FakeOAuth2, str]]:
    fake = FakeOAuth2(
        clients={VBOT_CLIENT: VBOT_SECRET},
        users={VBOT_USER: VBOT_PASSWORD},
        wall=clock.wall,
    )
    runner, url = await start_fake_oauth2(fake)
    yield fake, url
    await runner.cleanup()


async def test_no_secret_appears_in_logs_token_status_metrics_or_error_bodies(
    capture_logs: Callable[..., io.StringIO],
    start_proxy: ProxyFactory,
    fake: FakeRoyalti,
    fake_url: str,
    vbot: tuple[FakeOAuth2, str],
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    oauth, oauth_url = vbot
    refresh_tokens: list[str] = []
    access_tokens: list[str] = []
    # Before the proxy starts, so that the first login's refresh token is caught too.
    record_issued(fake, refresh_tokens, "issue_refresh_token")
    record_issued(fake, access_tokens, "issue_access_token")
    stream = capture_logs("json", "DEBUG")

    data = royalti_config(fake_url, default_workspace=WS[0], allowed_workspaces=list(WS[:3]))
    data["access_log"] = True
    data["tokens"] = {"max_backoff": "60s"}
    data["upstreams"].append(
        {
            "name": "vbot",
            "url": oauth_url,
            "path_prefix": "/vbot",
            "auth": {
                "type": "oauth2_password",
                "token_url": f"{oauth_url}/token",
                "username": VBOT_USER,
                "password": VBOT_PASSWORD,
                "client_id": VBOT_CLIENT,
                "client_secret": VBOT_SECRET,
                "client_auth": "basic",
            },
        }
    )
    proxy = await start_proxy(data)
    for manager in proxy.managers.values():
        await manager.wait_idle()

    answers: list[tuple[int, bytes, dict[str, str]]] = []

    async def send(path: str, workspace: str | None = None) -> int:
        answer = await get(http, proxy, path, workspace)
        answers.append(answer)
        return answer[0]

    # Traffic, then renewals through three access-token lifetimes and a new login.
    assert await send("/user/") == 200
    assert await send("/user/", WS[1]) == 200
    assert await send("/vbot/api/items") == 200
    await run_for(clock, proxy, 1800, 5)
    assert await send("/user/") == 200
    assert await send("/vbot/api/items") == 200

    # The upstreams reject tokens they issued: one replay each.
    fake.revoke_access_token(fake.tokens_seen[-1].removeprefix("Bearer "))
    assert await send("/user/") == 200
    oauth.revoke_all_access_tokens()
    assert await send("/vbot/api/items") == 200

    # The proxy's own errors: a workspace not allowed, no token to be had.
    assert await send("/user/", WS[3]) == 403
    fake.authtoken_failures = [(500, None)] * 5
    assert await send("/user/", WS[2]) == 503
    await run_for(clock, proxy, 20, 1)
    fake.authtoken_failures.clear()

    # An issuer that echoes secrets back in its error descriptions: the refresh token the
    # proxy is about to send, then the password and client secret.
    oauth.fail_next = [
        (
            400,
            {
                "error": "invalid_grant",
                "error_description": f"refresh token {oauth.refresh_issued[-1]} is spent",
            },
        ),
        (
            400,
            {
                "error": "invalid_grant",
                "error_description": f"{VBOT_USER}/{VBOT_PASSWORD} refused for {VBOT_SECRET}",
            },
        ),
    ]
    await run_for(clock, proxy, 1400, 5)  # past 85 % of the refresh token: a new login
    assert await send("/vbot/api/items") == 200

    assert fake.login_calls >= 2  # the refresh token was renewed by logging in again
    assert len(fake.tokens_seen) >= 4
    assert fake.unauthorized >= 1
    assert oauth.calls["refresh_token"] >= 2
    assert proxy.registry.get_sample_value("royalti_proxy_replays_total", {"upstream": "vbot"})
    assert proxy.registry.get_sample_value(
        "royalti_proxy_errors_total", {"code": "TOKEN_UNAVAILABLE"}
    )

    secrets = Secrets()
    secrets.add(PASSWORD, VBOT_PASSWORD, VBOT_SECRET, *refresh_tokens, *access_tokens)
    secrets.add(*(seen.removeprefix("Bearer ") for seen in fake.tokens_seen))
    secrets.add(*oauth.issued, *oauth.refresh_issued)
    basic = base64.b64encode(f"{VBOT_CLIENT}:{VBOT_SECRET}".encode()).decode()
    secrets.add(basic)
    needles = secrets.needles()

    texts: dict[str, str] = {}
    async with http.get(proxy.addresses["admin"] + "/tokens") as resp:
        texts["/tokens"] = await resp.text()
    async with http.get(proxy.addresses["admin"] + "/metrics") as resp:
        texts["/metrics"] = await resp.text()
    async with http.get(
        proxy.addresses["admin"] + "/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    ) as resp:
        texts["/metrics (openmetrics)"] = await resp.text()
    errors = [a for a in answers if a[0] >= 400 or ERROR_HEADER in a[2]]
    assert {a[2].get(ERROR_HEADER) for a in errors} == {
        "WORKSPACE_NOT_ALLOWED",
        "TOKEN_UNAVAILABLE",
    }
    for i, (status, body, headers) in enumerate(errors):
        texts[f"error body {i} ({status})"] = body.decode() + json.dumps(headers)
    for i, (_, _, headers) in enumerate(answers):
        texts[f"response headers {i}"] = json.dumps(headers)

    lines = stream.getvalue().splitlines()
    for i, line in enumerate(lines):
        texts[f"log line {i + 1}"] = line
    records = json_lines(stream)
    assert events(records, "access")
    assert events(records, "request_replayed")
    assert events(records, "token_fetch_failed")
    assert any(r["upstream"] == "vbot" for r in events(records, "token_renewed"))

    leaks = [
        (where, needle[:6] + "...")
        for where, text in texts.items()
        for needle in needles
        if needle in text
    ]
    leaks += [(where, "a JWT") for where, text in texts.items() if JWT.search(text)]
    assert not leaks
    assert len(refresh_tokens) >= 2 and len(access_tokens) >= 8
    print(f"leak test: scanned {len(lines)} log lines and {len(texts) - len(lines)} other texts")
