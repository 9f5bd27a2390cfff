"""OAuth2Source against the fake OAuth2 server, over real sockets (plain, TLS and mutual TLS)."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import ssl
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy.clock import FakeClock
from proxy.config import OAuth2Auth
from proxy.errors import CredentialRejected, RateLimited, TokenFetchError
from proxy.fakes.oauth2 import FakeOAuth2, start_fake_oauth2
from proxy.secret import Secret
from proxy.tokens.source import SINGLE_KEY
from proxy.tokens.sources.oauth2 import OAuth2Source
from proxy.tokens.token import fingerprint, safety_margin

USER = "agent@example.vn"
PASSWORD = "pa ss:w+rd/é&=1"
# RFC 6749 §2.3.1 matters only when these contain characters that form-encoding changes.
CLIENT_ID = "a b:c+d"
CLIENT_SECRET = "s3:cr+et/é %"


class Wall:
    """The fake server's wall clock, moved by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Serve = Callable[..., Awaitable[str]]


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners = []

    async def _serve(fake: FakeOAuth2, ssl_context: ssl.SSLContext | None = None) -> str:
        runner, url = await start_fake_oauth2(fake, ssl_context=ssl_context)
        runners.append(runner)
        return url

    yield _serve
    for runner in runners:
        await runner.cleanup()


def make_fake(wall: Wall, **kw: Any) -> FakeOAuth2:
    kw.setdefault("clients", {CLIENT_ID: CLIENT_SECRET})
    kw.setdefault("users", {USER: PASSWORD})
    return FakeOAuth2(wall=wall, **kw)


@pytest.fixture
def fake(wall: Wall) -> FakeOAuth2:
    return make_fake(wall)


def make_source(
    base_url: str, session: aiohttp.ClientSession, clock: FakeClock, **kw: Any
) -> OAuth2Source:
    """A source whose settings are the test user's, with ``kw`` overriding any of the
    :class:`~proxy.config.OAuth2Auth` fields or the constructor's other arguments."""
    settings: dict[str, Any] = {
        "grant": "password",
        "token_url": f"{base_url}/token",
        "client_id": CLIENT_ID,
        "client_secret": Secret(CLIENT_SECRET),
        "client_auth": "basic",
        "username": USER,
        "password": Secret(PASSWORD),
        "scope": None,
        "extra_params": {},
        "extra_headers": {},
        "default_lifetime": 300.0,
    }
    args: dict[str, Any] = {"timeout": 5.0, "session": session, "clock": clock}
    for name, value in kw.items():
        (settings if name in settings else args)[name] = value
    return OAuth2Source(settings=OAuth2Auth(**settings), **args)


@pytest.fixture
async def source(
    fake: FakeOAuth2, serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> OAuth2Source:
    return make_source(await serve(fake), session, clock)


# -- grants and rotation ----------------------------------------------------------------------


async def test_password_grant_comes_first_then_the_refresh_grant_with_the_newest_refresh_token(
    fake: FakeOAuth2, source: OAuth2Source
) -> None:
    first = await source.fetch(SINGLE_KEY)
    second = await source.fetch(SINGLE_KEY)

    assert [f["grant_type"] for f in fake.forms] == ["password", "refresh_token"]
    assert fake.forms[0]["username"] == USER
    assert fake.forms[0]["password"] == PASSWORD
    assert fake.forms[1]["refresh_token"] == fake.refresh_issued[0]
    assert "password" not in fake.forms[1]
    assert [first.value, second.value] == fake.issued
    assert fake.is_valid(second.value)
    assert source.kind == "oauth2_password"
    assert source.per_workspace is False
    assert fake.calls == {"password": 1, "refresh_token": 1}


async def test_refresh_token_rotates_on_every_fetch_and_none_is_ever_sent_twice(
    fake: FakeOAuth2, source: OAuth2Source
) -> None:
    for _ in range(25):
        await source.fetch(SINGLE_KEY)

    sent = [f["refresh_token"] for f in fake.forms[1:]]
    assert sent == fake.refresh_issued[:-1]
    assert len(set(sent)) == 24
    assert fake.reused_refresh_tokens == 0
    assert fake.calls == {"password": 1, "refresh_token": 24}
    assert source.credential_status().fingerprint == fingerprint(fake.refresh_issued[-1])


async def test_concurrent_fetches_are_serialised_and_never_spend_a_refresh_token_twice(
    fake: FakeOAuth2, source: OAuth2Source
) -> None:
    tokens = await asyncio.gather(*(source.fetch(SINGLE_KEY) for _ in range(6)))

    assert len({t.value for t in tokens}) == 6
    assert fake.calls == {"password": 1, "refresh_token": 5}
    assert fake.reused_refresh_tokens == 0


async def test_invalid_grant_on_refresh_falls_back_to_one_password_grant_in_the_same_fetch(
    fake: FakeOAuth2, source: OAuth2Source
) -> None:
    await source.fetch(SINGLE_KEY)
    fake.revoke_all_refresh_tokens()

    token = await source.fetch(SINGLE_KEY)

    assert [f["grant_type"] for f in fake.forms] == ["password", "refresh_token", "password"]
    assert fake.is_valid(token.value)
    assert fake.calls == {"password": 2, "refresh_token": 1}
    # The chain goes on from the fallback's refresh token.
    await source.fetch(SINGLE_KEY)
    assert fake.forms[-1]["refresh_token"] == fake.refresh_issued[-2]
    assert fake.reused_refresh_tokens == 0


async def test_refused_refresh_and_refused_password_raise_credential_rejected_after_one_fallback(
    fake: FakeOAuth2, source: OAuth2Source
) -> None:
    await source.fetch(SINGLE_KEY)
    fake.revoke_all_refresh_tokens()
    fake.users[USER] = "changed by the operator"

    with pytest.raises(CredentialRejected) as info:
        await source.fetch(SINGLE_KEY)

    assert info.value.code == "invalid_grant"
    assert fake.calls == {"password": 2, "refresh_token": 1}


async def test_a_refresh_that_fails_after_being_sent_is_followed_by_a_password_grant_not_a_replay(
    fake: FakeOAuth2, source: OAuth2Source
) -> None:
    await source.fetch(SINGLE_KEY)
    fake.fail_next = [(502, None)]
    with pytest.raises(TokenFetchError) as info:
        await source.fetch(SINGLE_KEY)
    assert info.value.code == "HTTP_502"
    assert source.credential_status().kind == "password"

    await source.fetch(SINGLE_KEY)

    assert [f["grant_type"] for f in fake.forms] == ["password", "refresh_token", "password"]
    assert fake.reused_refresh_tokens == 0


async def test_a_refresh_lost_on_the_network_is_followed_by_a_password_grant(
    fake: FakeOAuth2, serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    url = await serve(fake)
    source = make_source(url, session, clock)
    await source.fetch(SINGLE_KEY)
    # Same source, endpoint moved to one that drops the connection: the refresh token leaves
    # and never returns.
    lost: list[str] = []

    async def drop(request: web.Request) -> web.Response:
        lost.append(str((await request.post())["grant_type"]))
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    dropping = web.Application()
    dropping.router.add_post("/token", drop)
    runner = web.AppRunner(dropping)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        source.token_url = f"http://127.0.0.1:{runner.addresses[0][1]}/token"
        with pytest.raises(TokenFetchError) as info:
            await source.fetch(SINGLE_KEY)
    finally:
        await runner.cleanup()
    assert info.value.code == "NETWORK"
    assert lost == ["refresh_token"]

    source.token_url = f"{url}/token"
    await source.fetch(SINGLE_KEY)

    assert [f["grant_type"] for f in fake.forms] == ["password", "password"]


async def test_an_issuer_without_the_refresh_grant_gets_password_grants_only(
    fake: FakeOAuth2, source: OAuth2Source
) -> None:
    await source.fetch(SINGLE_KEY)
    fake.fail_next = [(400, {"error": "unsupported_grant_type"})]

    await source.fetch(SINGLE_KEY)
    await source.fetch(SINGLE_KEY)

    assert [f["grant_type"] for f in fake.forms] == [
        "password",
        "refresh_token",
        "password",
        "password",
    ]


async def test_client_credentials_grant_is_sent_on_every_fetch(
    fake: FakeOAuth2, serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = make_source(
        await serve(fake),
        session,
        clock,
        grant="client_credentials",
        username=None,
        password=None,
        client_auth="post",
    )
    for _ in range(3):
        token = await source.fetch(SINGLE_KEY)

    assert fake.calls == {"client_credentials": 3}
    assert fake.is_valid(token.value)
    assert source.kind == "oauth2_client_credentials"
    status = source.credential_status()
    assert (status.kind, status.fingerprint, status.renewable) == (
        "client_credentials",
        None,
        True,
    )


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("client_auth", ["basic", "post"])
async def test_a_wrong_client_secret_raises_credential_rejected_invalid_client(
    fake: FakeOAuth2,
    serve: Serve,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    client_auth: str,
) -> None:
    fake.clients[CLIENT_ID] = "rotated"
    source = make_source(await serve(fake), session, clock, client_auth=client_auth)

    with pytest.raises(CredentialRejected) as info:
        await source.fetch(SINGLE_KEY)

    assert info.value.code == "invalid_client"
    assert source.credential_status().last_error == "invalid_client"


async def test_unauthorized_client_raises_credential_rejected(
    fake: FakeOAuth2, source: OAuth2Source
) -> None:
    fake.fail_next = [(400, {"error": "unauthorized_client"})]
    with pytest.raises(CredentialRejected) as info:
        await source.fetch(SINGLE_KEY)
    assert info.value.code == "unauthorized_client"


async def test_a_bare_401_raises_credential_rejected(
    fake: FakeOAuth2, source: OAuth2Source
) -> None:
    fake.fail_next = [(401, None)]
    with pytest.raises(CredentialRejected) as info:
        await source.fetch(SINGLE_KEY)
    assert info.value.code == "HTTP_401"


async def test_other_rfc6749_errors_raise_a_retryable_error_named_after_them(
    fake: FakeOAuth2, source: OAuth2Source
) -> None:
    fake.fail_next = [(400, {"error": "invalid_scope", "error_description": "no such scope"})]
    with pytest.raises(TokenFetchError) as info:
        await source.fetch(SINGLE_KEY)
    assert not isinstance(info.value, CredentialRejected)
    assert info.value.code == "invalid_scope"
    assert "no such scope" in info.value.message


async def test_429_with_retry_after_raises_rate_limited_with_the_delay(
    fake: FakeOAuth2, source: OAuth2Source
) -> None:
    fake.fail_next = [(429, {"error": "slow_down"}, {"Retry-After": "17"})]
    with pytest.raises(RateLimited) as info:
        await source.fetch(SINGLE_KEY)
    assert info.value.code == "HTTP_429"
    assert info.value.retry_after == 17.0


async def test_500_raises_token_fetch_error_http_500(
    fake: FakeOAuth2, source: OAuth2Source
) -> None:
    fake.fail_next = [(500, {"error": "server_error"})]
    with pytest.raises(TokenFetchError) as info:
        await source.fetch(SINGLE_KEY)
    assert info.value.code == "HTTP_500"
    assert source.credential_status().last_error == "HTTP_500"
    await source.fetch(SINGLE_KEY)
    assert source.credential_status().last_error is None


@pytest.mark.parametrize(
    "body",
    [
        {"token_type": "bearer", "expires_in": 60},
        {"access_token": "", "expires_in": 60},
        {"access_token": 42},
        None,
    ],
)
async def test_a_200_without_an_access_token_string_is_a_bad_response(
    fake: FakeOAuth2, source: OAuth2Source, body: dict[str, Any] | None
) -> None:
    fake.fail_next = [(200, body)]
    with pytest.raises(TokenFetchError) as info:
        await source.fetch(SINGLE_KEY)
    assert info.value.code == "BAD_RESPONSE"


# -- lifetimes and token types ----------------------------------------------------------------


async def test_expires_in_sets_the_lifetime_of_an_opaque_token(
    wall: Wall, serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake = make_fake(wall, expires_in=899)
    source = make_source(await serve(fake), session, clock)

    token = await source.fetch(SINGLE_KEY)

    assert token.value.count(".") != 2
    assert token.lifetime == pytest.approx(899 - safety_margin(899))
    assert token.obtained_at == clock.monotonic()
    assert token.wall_expires_at == pytest.approx(clock.wall() + token.lifetime)


async def test_expires_in_as_a_numeric_string_is_honoured(
    fake: FakeOAuth2, source: OAuth2Source
) -> None:
    fake.fail_next = [
        (200, {"access_token": "opaque", "token_type": "bearer", "expires_in": "120"})
    ]
    token = await source.fetch(SINGLE_KEY)
    assert token.lifetime == pytest.approx(120 - safety_margin(120))


async def test_without_expires_in_a_jwt_lifetime_comes_from_its_exp(
    wall: Wall, serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake = make_fake(wall, expires_in=1200, jwt_tokens=True, send_expires_in=False)
    source = make_source(await serve(fake), session, clock, default_lifetime=77.0)

    token = await source.fetch(SINGLE_KEY)

    assert token.value.count(".") == 2
    assert token.lifetime == pytest.approx(1200 - safety_margin(1200))


async def test_without_expires_in_or_jwt_the_default_lifetime_is_used_with_one_warning(
    wall: Wall,
    serve: Serve,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = make_fake(wall, send_expires_in=False)
    source = make_source(await serve(fake), session, clock, default_lifetime=77.0)

    with caplog.at_level(logging.WARNING, logger="proxy.tokens"):
        first = await source.fetch(SINGLE_KEY)
        await source.fetch(SINGLE_KEY)

    assert first.lifetime == pytest.approx(77 - safety_margin(77))
    warnings = [r for r in caplog.records if getattr(r, "event", "") == "oauth2_default_lifetime"]
    assert len(warnings) == 1


@pytest.mark.parametrize("token_type", ["Bearer", "BEARER", "bearer"])
async def test_token_type_bearer_is_accepted_in_any_case(
    wall: Wall,
    serve: Serve,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    token_type: str,
) -> None:
    fake = make_fake(wall, token_type=token_type)
    source = make_source(await serve(fake), session, clock)
    assert fake.is_valid((await source.fetch(SINGLE_KEY)).value)


async def test_a_mac_token_type_is_rejected(
    wall: Wall, serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake = make_fake(wall, token_type="mac")
    source = make_source(await serve(fake), session, clock)
    with pytest.raises(TokenFetchError) as info:
        await source.fetch(SINGLE_KEY)
    assert info.value.code == "BAD_TOKEN_TYPE"


# -- what goes on the wire --------------------------------------------------------------------


async def test_basic_client_auth_form_urlencodes_id_and_secret_before_base64(
    fake: FakeOAuth2, source: OAuth2Source
) -> None:
    await source.fetch(SINGLE_KEY)

    # RFC 6749 §2.3.1: "a b:c+d" -> "a+b%3Ac%2Bd", then Basic (RFC 7617).
    pair = "a+b%3Ac%2Bd:s3%3Acr%2Bet%2F%C3%A9+%25"
    expected = "Basic " + base64.b64encode(pair.encode()).decode()
    assert fake.headers_seen[0]["Authorization"] == expected
    assert fake.client_auth_seen == ["basic"]
    assert "client_secret" not in fake.forms[0]


async def test_post_client_auth_sends_id_and_secret_as_form_fields(
    fake: FakeOAuth2, serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = make_source(await serve(fake), session, clock, client_auth="post")
    await source.fetch(SINGLE_KEY)
    await source.fetch(SINGLE_KEY)

    assert fake.client_auth_seen == ["post", "post"]
    for form, headers in zip(fake.forms, fake.headers_seen, strict=True):
        assert form["client_id"] == CLIENT_ID
        assert form["client_secret"] == CLIENT_SECRET
        assert "Authorization" not in headers


async def test_no_client_auth_sends_only_the_public_client_id(
    wall: Wall, serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake = make_fake(wall, clients={"public-app": None})
    source = make_source(
        await serve(fake),
        session,
        clock,
        client_auth="none",
        client_id="public-app",
        client_secret=None,
    )
    await source.fetch(SINGLE_KEY)

    assert fake.client_auth_seen == ["none"]
    assert fake.forms[0]["client_id"] == "public-app"
    assert "client_secret" not in fake.forms[0]


async def test_extra_params_scope_and_headers_reach_the_token_endpoint(
    fake: FakeOAuth2, serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = make_source(
        await serve(fake),
        session,
        clock,
        scope="calls.read calls.write",
        extra_params={"audience": "https://open-api.vbot.vn", "resource": "urn:vbot"},
        extra_headers={"X-Tenant-Id": "t-42"},
    )
    await source.fetch(SINGLE_KEY)
    await source.fetch(SINGLE_KEY)

    password, refresh = fake.forms
    assert password["scope"] == "calls.read calls.write"
    # RFC 6749 §6: an omitted scope on refresh means the one originally granted.
    assert "scope" not in refresh
    for form in (password, refresh):
        assert form["audience"] == "https://open-api.vbot.vn"
        assert form["resource"] == "urn:vbot"
    for headers in fake.headers_seen:
        assert headers["X-Tenant-Id"] == "t-42"
        assert headers["Accept"] == "application/json"
        assert headers["Content-Type"] == "application/x-www-form-urlencoded"


# -- secrets stay secret ----------------------------------------------------------------------


def _echo(text: str) -> dict[str, Any]:
    return {"error": "invalid_request", "error_description": f"bad request: {text}"}


FAILURES: list[tuple[str, list[Any], str]] = [
    ("wrong password", [], "invalid_grant"),
    ("500", [(500, {"error": "server_error"})], "HTTP_500"),
    ("429", [(429, None, {"Retry-After": "3"})], "HTTP_429"),
    ("unauthorized", [(400, {"error": "unauthorized_client"})], "unauthorized_client"),
    ("echoed password", [(400, _echo(PASSWORD))], "invalid_request"),
    ("echoed secret", [(400, _echo(CLIENT_SECRET))], "invalid_request"),
    ("secret as code", [(400, {"error": CLIENT_SECRET})], "BAD_RESPONSE"),
    ("mac token", [(200, {"access_token": "t0ken-value", "token_type": "mac"})], "BAD_TOKEN_TYPE"),
    ("expired", [(200, {"access_token": "t0ken-value", "expires_in": 0})], "TOKEN_EXPIRED"),
]


def _assert_no_secret(exc: BaseException, secrets: list[str]) -> None:
    shown = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    for secret in secrets:
        for text in shown:
            assert secret not in text


@pytest.mark.parametrize(("name", "canned", "code"), FAILURES, ids=[f[0] for f in FAILURES])
async def test_no_secret_or_token_appears_in_any_exception(
    fake: FakeOAuth2, source: OAuth2Source, name: str, canned: list[Any], code: str
) -> None:
    if name == "wrong password":
        fake.users[USER] = "something else"
    fake.fail_next = list(canned)

    with pytest.raises(TokenFetchError) as info:
        await source.fetch(SINGLE_KEY)

    assert info.value.code == code
    _assert_no_secret(info.value, [PASSWORD, CLIENT_SECRET, "t0ken-value"])


async def test_a_refresh_token_echoed_by_the_issuer_does_not_appear_in_the_exception(
    fake: FakeOAuth2, source: OAuth2Source
) -> None:
    await source.fetch(SINGLE_KEY)
    refresh = fake.refresh_issued[-1]
    fake.fail_next = [(400, {"error": "invalid_scope", "error_description": f"bad {refresh}"})]

    with pytest.raises(TokenFetchError) as info:
        await source.fetch(SINGLE_KEY)

    _assert_no_secret(info.value, [refresh, PASSWORD, CLIENT_SECRET])


async def test_an_error_code_that_is_a_well_formed_secret_is_not_echoed(
    wall: Wall, serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    ascii_password = "hunter2-only-ascii"
    fake = make_fake(wall, users={USER: ascii_password})
    source = make_source(await serve(fake), session, clock, password=Secret(ascii_password))
    fake.fail_next = [(400, {"error": ascii_password, "error_description": ascii_password})]

    with pytest.raises(TokenFetchError) as info:
        await source.fetch(SINGLE_KEY)

    assert info.value.code == "BAD_RESPONSE"
    _assert_no_secret(info.value, [ascii_password])


async def test_a_network_failure_shows_no_secret(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = make_source("http://127.0.0.1:9", session, clock)
    with pytest.raises(TokenFetchError) as info:
        await source.fetch(SINGLE_KEY)
    assert info.value.code == "NETWORK"
    _assert_no_secret(info.value, [PASSWORD, CLIENT_SECRET])


def test_secrets_do_not_show_in_the_source_repr_or_status(clock: FakeClock) -> None:
    source = OAuth2Source(
        settings=OAuth2Auth(
            grant="password",
            token_url="https://id.example/token",
            client_id=CLIENT_ID,
            client_secret=Secret(CLIENT_SECRET),
            client_auth="post",
            username=USER,
            password=Secret(PASSWORD),
            scope=None,
            extra_params={},
            extra_headers={},
            default_lifetime=60.0,
        ),
        timeout=1.0,
        session=None,  # type: ignore[arg-type]  # never used: no fetch
        clock=clock,
    )
    for text in (repr(source), repr(source.credential_status()), repr(vars(source))):
        assert PASSWORD not in text
    assert source.credential_status().fingerprint is None


# -- wiring -----------------------------------------------------------------------------------


async def test_fetching_for_a_workspace_key_is_a_wiring_error(source: OAuth2Source) -> None:
    with pytest.raises(ValueError, match="not per workspace"):
        await source.fetch("ws-1")


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def server_mtls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_tls(ca: trustme.CA, *, with_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if with_cert:
        ca.issue_cert("proxy@client.example").configure_cert(ctx)
    return ctx


async def test_tls_with_a_private_ca_works_when_the_source_trusts_the_ca(
    fake: FakeOAuth2,
    serve: Serve,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    ca: trustme.CA,
    server_tls: ssl.SSLContext,
) -> None:
    url = await serve(fake, ssl_context=server_tls)
    assert url.startswith("https://")
    source = make_source(url, session, clock, ssl_context=client_tls(ca))

    token = await source.fetch(SINGLE_KEY)

    assert fake.is_valid(token.value)


async def test_tls_with_a_private_ca_fails_as_tls_error_under_the_default_trust_store(
    fake: FakeOAuth2,
    serve: Serve,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    server_tls: ssl.SSLContext,
) -> None:
    source = make_source(await serve(fake, ssl_context=server_tls), session, clock)

    with pytest.raises(TokenFetchError) as info:
        await source.fetch(SINGLE_KEY)

    assert info.value.code == "TLS_ERROR"
    assert fake.calls == {}


async def test_mutual_tls_works_when_the_source_presents_a_client_certificate(
    fake: FakeOAuth2,
    serve: Serve,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    ca: trustme.CA,
    server_mtls: ssl.SSLContext,
) -> None:
    url = await serve(fake, ssl_context=server_mtls)
    source = make_source(url, session, clock, ssl_context=client_tls(ca, with_cert=True))

    token = await source.fetch(SINGLE_KEY)

    assert fake.is_valid(token.value)


async def test_mutual_tls_fails_when_the_source_has_no_client_certificate(
    fake: FakeOAuth2,
    serve: Serve,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    ca: trustme.CA,
    server_mtls: ssl.SSLContext,
) -> None:
    url = await serve(fake, ssl_context=server_mtls)
    source = make_source(url, session, clock, ssl_context=client_tls(ca))

    with pytest.raises(TokenFetchError) as info:
        await source.fetch(SINGLE_KEY)

    assert info.value.code in ("TLS_ERROR", "NETWORK")
    assert fake.calls == {}


# -- the fake itself (other tests rely on it) -------------------------------------------------


async def test_fake_api_accepts_a_fresh_token_and_refuses_it_once_its_wall_clock_passes_expiry(
    wall: Wall, serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake = make_fake(wall, expires_in=60, expired_token_status=403)
    url = await serve(fake)
    token = await make_source(url, session, clock).fetch(SINGLE_KEY)

    async with session.get(
        f"{url}/api/v2.0/calls?page=1", headers={"Authorization": f"Bearer {token.value}"}
    ) as resp:
        assert resp.status == 200
        echo = await resp.json()
        assert email.utils.parsedate_to_datetime(resp.headers["Date"]).timestamp() == wall.now
    assert (echo["method"], echo["path"], echo["query"]) == ("GET", "/api/v2.0/calls", "page=1")

    async with session.get(f"{url}/api/x", headers={"X-API-Key": token.value}) as resp:
        assert resp.status == 200
    assert fake.auth_headers_seen == ["authorization", "x-api-key"]

    wall.now += 60
    async with session.get(f"{url}/api/x", headers={"X-API-Key": token.value}) as resp:
        assert resp.status == 403
        assert "invalid_token" in resp.headers["WWW-Authenticate"]
    async with session.get(f"{url}/api/x") as resp:
        assert resp.status == 401


async def test_fake_revokes_the_previous_access_token_on_refresh_when_asked(
    wall: Wall, serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake = make_fake(wall, revoke_old_access_on_refresh=True)
    source = make_source(await serve(fake), session, clock)

    first = await source.fetch(SINGLE_KEY)
    second = await source.fetch(SINGLE_KEY)

    assert not fake.is_valid(first.value)
    assert fake.is_valid(second.value)


async def test_fake_refuses_and_counts_a_reused_refresh_token(
    fake: FakeOAuth2, serve: Serve, session: aiohttp.ClientSession
) -> None:
    url = await serve(fake)
    form = {"grant_type": "password", "username": USER, "password": PASSWORD}
    post = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    async with session.post(f"{url}/token", data={**form, **post}) as resp:
        refresh = (await resp.json())["refresh_token"]
    for expected in (200, 400):
        body = {"grant_type": "refresh_token", "refresh_token": refresh, **post}
        async with session.post(f"{url}/token", data=body) as resp:
            assert resp.status == expected
            if expected == 400:
                assert (await resp.json())["error"] == "invalid_grant"
    assert fake.reused_refresh_tokens == 1
