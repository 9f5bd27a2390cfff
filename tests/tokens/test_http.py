"""The one call to a token endpoint, against real servers: JSON decoded, Retry-After read
against the server's Date, bounded bodies, no redirects, and every failure a TokenFetchError."""

from __future__ import annotations

import asyncio
import email.utils
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy.errors import RateLimited, TokenFetchError
from proxy.tokens.sources.http import call_token_endpoint, parse_retry_after, status_error
from tests.conftest import Serve, free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def app(handler: Handler) -> web.Application:
    application = web.Application()
    application.router.add_route("*", "/token", handler)
    return application


async def test_a_json_answer_is_decoded_with_its_status_and_the_form_is_sent(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    seen: dict[str, str] = {}

    async def token(request: web.Request) -> web.Response:
        seen.update({k: str(v) for k, v in (await request.post()).items()})
        return web.json_response({"access_token": "abc", "expires_in": 60}, status=201)

    url = await serve(app(token))
    resp = await call_token_endpoint(
        session, "POST", url + "/token", form={"grant_type": "password"}, timeout=5
    )
    assert (resp.status, resp.body) == (201, {"access_token": "abc", "expires_in": 60})
    assert seen == {"grant_type": "password"}
    assert resp.server_time is not None  # aiohttp sends Date


async def test_a_body_that_is_not_json_reads_as_none(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    async def token(request: web.Request) -> web.Response:
        return web.Response(text="<html>maintenance</html>", status=503)

    resp = await call_token_endpoint(session, "GET", await serve(app(token)) + "/token", timeout=5)
    assert (resp.status, resp.body) == (503, None)
    error = status_error(resp, "the login")
    assert (error.code, type(error)) == ("HTTP_503", TokenFetchError)


async def test_a_429_with_an_http_date_retry_after_is_rate_limited_for_the_servers_interval(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    now = 1_800_000_000.0

    async def token(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": "slow_down"},
            status=429,
            headers={
                "Date": email.utils.formatdate(now, usegmt=True),
                "Retry-After": email.utils.formatdate(now + 120, usegmt=True),
            },
        )

    resp = await call_token_endpoint(session, "POST", await serve(app(token)) + "/token", timeout=5)
    assert resp.retry_after == 120.0  # whatever our own clock says
    error = status_error(resp, "the login")
    assert isinstance(error, RateLimited)
    assert (error.code, error.retry_after) == ("HTTP_429", 120.0)


def test_retry_after_in_seconds_and_the_forms_it_ignores() -> None:
    assert parse_retry_after(" 30 ", None) == 30.0
    assert parse_retry_after(None, None) is None
    assert parse_retry_after("soon", 0.0) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", None) is None  # no Date to compare
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 2e9) == 0.0  # already past


async def test_a_redirect_is_returned_not_followed(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    followed: list[str] = []

    async def token(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async def elsewhere(request: web.Request) -> web.Response:
        followed.append(request.path)
        return web.json_response({})

    application = app(token)
    application.router.add_get("/elsewhere", elsewhere)
    resp = await call_token_endpoint(
        session, "POST", await serve(application) + "/token", timeout=5
    )
    assert resp.status == 302
    assert followed == []


async def test_a_body_over_the_limit_is_refused_however_it_is_split(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    async def token(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(4):
            await response.write(b"x" * 300)
        await response.write_eof()
        return response

    url = await serve(app(token)) + "/token"
    with pytest.raises(TokenFetchError) as info:
        await call_token_endpoint(session, "GET", url, timeout=5, max_body=1000)
    assert info.value.code == "BODY_TOO_LARGE"
    resp = await call_token_endpoint(session, "GET", url, timeout=5, max_body=1200)
    assert resp.body is None and resp.status == 200  # exactly the limit is read


async def test_a_server_that_does_not_answer_in_time_is_a_timeout(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    never = asyncio.Event()

    async def token(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    with pytest.raises(TokenFetchError) as info:
        await call_token_endpoint(session, "GET", await serve(app(token)) + "/token", timeout=0.1)
    assert info.value.code == "TIMEOUT"


async def test_nothing_listening_is_a_network_error(session: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{free_port()}/token"
    with pytest.raises(TokenFetchError) as info:
        await call_token_endpoint(session, "GET", url, timeout=5)
    assert info.value.code == "NETWORK"
    assert isinstance(info.value.__cause__, aiohttp.ClientError)  # translated, chained


async def test_a_certificate_we_do_not_trust_is_a_tls_error(
    session: aiohttp.ClientSession,
) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)

    async def token(request: web.Request) -> web.Response:
        return web.json_response({})

    runner = web.AppRunner(app(token))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with pytest.raises(TokenFetchError) as info:
            await call_token_endpoint(session, "GET", f"https://127.0.0.1:{port}/token", timeout=5)
        assert info.value.code == "TLS_ERROR"
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        resp = await call_token_endpoint(
            session, "GET", f"https://127.0.0.1:{port}/token", timeout=5, ssl_context=trusting
        )
        assert resp.status == 200
    finally:
        await runner.cleanup()
