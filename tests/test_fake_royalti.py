"""The fake Royalti API behaves as UPSTREAMS.md says, on a real socket, with an injected clock."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import parsedate_to_datetime

import aiohttp
import jwt
import pytest
from yarl import URL

from proxy.fakes.royalti import DEFAULT_WORKSPACES, FakeRoyalti, csv_bytes, start_fake

EMAIL = "ops@example.com"
PASSWORD = "correct-horse"
WS = DEFAULT_WORKSPACES[0][0]


class Wall:
    """A wall clock that moves only when a test moves it."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Api:
    """A started fake, its clock, and a client session pointed at it."""

    def __init__(self, fake: FakeRoyalti, wall: Wall, url: str, session: aiohttp.ClientSession):
        self.fake = fake
        self.wall = wall
        self.url = url
        self.session = session

    async def login(self, password: str = PASSWORD) -> aiohttp.ClientResponse:
        body = {"email": EMAIL, "password": password, "rememberMe": True}
        async with self.session.post(f"{self.url}/auth/login", json=body) as resp:
            await resp.read()
            return resp

    async def refresh_token(self) -> str:
        async with self.session.post(
            f"{self.url}/auth/login", json={"email": EMAIL, "password": PASSWORD}
        ) as resp:
            assert resp.status == 200
            return str((await resp.json())["refresh_token"])

    async def authtoken(self, refresh: str, workspace: str = WS) -> aiohttp.ClientResponse:
        async with self.session.get(
            f"{self.url}/auth/authtoken",
            params={"currentWorkspace": workspace},
            headers={"Authorization": f"Bearer {refresh}"},
        ) as resp:
            await resp.read()
            return resp

    async def access_token(self, workspace: str = WS) -> str:
        resp = await self.authtoken(await self.refresh_token(), workspace)
        assert resp.status == 200
        return str((await resp.json())["data"]["access_token"])


Start = Callable[..., Awaitable[Api]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    runners: list[aiohttp.web.AppRunner] = []
    session = aiohttp.ClientSession()

    async def _start(**kwargs: object) -> Api:
        wall = Wall()
        fake = FakeRoyalti(wall=wall, **kwargs)  # type: ignore[arg-type]
        runner, url = await start_fake(fake)
        runners.append(runner)
        return Api(fake, wall, url, session)

    yield _start
    await session.close()
    for runner in runners:
        await runner.cleanup()


def claims(token: str) -> dict[str, object]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_login_returns_workspaces_and_a_24h_refresh_token_but_no_access_token(
    start: Start,
) -> None:
    api = await start()
    resp = await api.login()
    body = await resp.json()
    assert resp.status == 200
    assert body["message"] == "Successful"
    assert [w["workspaceId"] for w in body["workspaces"]] == [w for w, _ in DEFAULT_WORKSPACES]
    assert body["workspaces"][0] == {
        "workspaceId": WS,
        "name": DEFAULT_WORKSPACES[0][1],
        "status": "active",
        "role": "owner",
    }
    assert "access_token" not in body
    refresh = claims(body["refresh_token"])
    assert refresh["name"] == "refresh_token"
    assert refresh["iat"] == int(api.wall.now)
    assert refresh["exp"] == int(api.wall.now) + 86400
    assert parsedate_to_datetime(resp.headers["Date"]).timestamp() == int(api.wall.now)
    assert api.fake.login_calls == 1


@pytest.mark.parametrize(("jwt_offset", "date_offset"), [(-3600.0, 0.0), (3600.0, 120.0)])
async def test_the_issuer_clock_and_the_date_clock_are_set_apart_independently(
    start: Start, jwt_offset: float, date_offset: float
) -> None:
    api = await start(jwt_offset=jwt_offset, date_offset=date_offset)
    refresh = await api.refresh_token()
    resp = await api.authtoken(refresh)
    assert resp.status == 200
    access = claims((await resp.json())["data"]["access_token"])
    assert access["iat"] == int(api.wall.now + jwt_offset)
    assert access["exp"] == int(api.wall.now + jwt_offset) + 6 * 3600
    assert claims(refresh)["iat"] == int(api.wall.now + jwt_offset)
    date = parsedate_to_datetime(resp.headers["Date"]).timestamp()
    assert date == int(api.wall.now + date_offset)


async def test_expiry_is_judged_on_the_issuers_clock_not_the_date_clock(start: Start) -> None:
    # The Date clock is 7 h ahead: by it every token is expired, by the issuer's none is.
    api = await start(date_offset=7 * 3600.0)
    token = await api.access_token()
    async with api.session.get(f"{api.url}/user/", headers=bearer(token)) as resp:
        assert resp.status == 200
    api.fake.jwt_offset = 6 * 3600.0
    async with api.session.get(f"{api.url}/user/", headers=bearer(token)) as resp:
        assert resp.status == 401
    assert api.fake.expired_seen == 1


async def test_two_logins_in_the_same_second_give_different_refresh_tokens(start: Start) -> None:
    api = await start()
    assert await api.refresh_token() != await api.refresh_token()


async def test_bad_password_is_401_in_the_royalti_envelope(start: Start) -> None:
    api = await start()
    resp = await api.login(password="wrong")
    body = await resp.json()
    assert resp.status == 401
    assert body["success"] is False
    assert set(body["error"]) == {"code", "message", "details"}


async def test_login_rate_limit_answers_429_with_retry_after_until_the_window_slides(
    start: Start,
) -> None:
    api = await start(login_limit=3, login_window=180.0)
    for _ in range(3):
        assert (await api.login()).status == 200
        api.wall.now += 10
    limited = await api.login()
    assert limited.status == 429
    assert limited.headers["Retry-After"] == "150"  # the first call frees its slot at +180 s
    assert (await limited.json())["error"]["code"] == "TOO_MANY_REQUESTS"
    assert api.fake.login_calls == 4

    api.wall.now += 150
    assert (await api.login()).status == 200
    assert (await api.login()).status == 429


async def test_authtoken_gives_one_access_token_per_workspace_with_a_6h_lifetime(
    start: Start,
) -> None:
    api = await start()
    refresh = await api.refresh_token()
    for workspace, name in DEFAULT_WORKSPACES[:2]:
        resp = await api.authtoken(refresh, workspace)
        body = await resp.json()
        assert resp.status == 200
        assert body["status"] == "success"
        assert body["message"] == f"Access token generated for {name}"
        token = claims(body["data"]["access_token"])
        assert token["activeWorkspace"] == workspace
        assert token["name"] == EMAIL
        assert token["exp"] - token["iat"] == 6 * 3600  # type: ignore[operator]
    assert api.fake.authtoken_calls == {WS: 1, "ws-beta": 1}


async def test_authtoken_records_user_id_and_can_omit_iat(start: Start) -> None:
    api = await start(omit_iat=True)
    refresh = await api.refresh_token()
    async with api.session.get(
        f"{api.url}/auth/authtoken",
        params={"currentWorkspace": WS, "userId": "u-42"},
        headers=bearer(refresh),
    ) as resp:
        token = claims((await resp.json())["data"]["access_token"])
    assert "iat" not in token
    assert token["exp"] == int(api.wall.now) + 6 * 3600
    assert api.fake.last_user_id == "u-42"


async def test_authtoken_for_an_unknown_workspace_is_404(start: Start) -> None:
    api = await start()
    resp = await api.authtoken(await api.refresh_token(), "ws-nope")
    assert resp.status == 404
    assert (await resp.json())["success"] is False


async def test_authtoken_with_a_revoked_or_expired_refresh_token_is_401(start: Start) -> None:
    api = await start()
    refresh = await api.refresh_token()
    api.fake.revoke_refresh_tokens()
    assert (await api.authtoken(refresh)).status == 401
    fresh = await api.refresh_token()
    assert (await api.authtoken(fresh)).status == 200
    api.wall.now += 86400
    assert (await api.authtoken(fresh)).status == 401


async def test_an_access_token_is_refused_as_a_refresh_token_and_vice_versa(start: Start) -> None:
    api = await start()
    access = await api.access_token()
    assert (await api.authtoken(access)).status == 401
    refresh = await api.refresh_token()
    async with api.session.get(f"{api.url}/asset", headers=bearer(refresh)) as resp:
        assert resp.status == 401


async def test_expired_access_token_is_401_and_counted_in_expired_seen(start: Start) -> None:
    api = await start()
    token = await api.access_token()
    async with api.session.get(f"{api.url}/user/", headers=bearer(token)) as resp:
        assert resp.status == 200
        assert (await resp.json())["workspace"] == WS
    api.wall.now += 6 * 3600
    async with api.session.get(f"{api.url}/user/", headers=bearer(token)) as resp:
        body = await resp.json()
        assert resp.status == 401
        assert body["error"]["code"] == "UNAUTHORIZED"
    assert (api.fake.expired_seen, api.fake.unauthorized, api.fake.api_calls) == (1, 1, 2)
    assert api.fake.tokens_seen == [f"Bearer {token}"] * 2


async def test_revoked_and_pre_cutoff_access_tokens_are_401_but_new_ones_work(start: Start) -> None:
    api = await start()
    first, second = await api.access_token(), await api.access_token()
    api.fake.revoke_access_token(first)
    async with api.session.get(f"{api.url}/asset", headers=bearer(first)) as resp:
        assert resp.status == 401
    api.wall.now += 0.5
    api.fake.reject_all_access_before = api.wall.now
    async with api.session.get(f"{api.url}/asset", headers=bearer(second)) as resp:
        assert resp.status == 401
    third = await api.access_token()
    async with api.session.get(f"{api.url}/asset", headers=bearer(third)) as resp:
        assert resp.status == 200
    assert api.fake.expired_seen == 0
    assert api.fake.unauthorized == 2


async def test_missing_or_forged_credentials_are_401(start: Start) -> None:
    api = await start()
    async with api.session.get(f"{api.url}/product/") as resp:
        assert resp.status == 401
    forged = jwt.encode({"activeWorkspace": WS, "exp": 2_000_000_000}, "x" * 32, algorithm="HS256")
    async with api.session.get(f"{api.url}/product/", headers=bearer(forged)) as resp:
        assert resp.status == 401
    assert api.fake.unauthorized == 2


async def test_a_workspace_api_key_works_without_any_exchange(start: Start) -> None:
    api = await start()
    async with api.session.get(
        f"{api.url}/royalty/dsp", params={"page": "2", "size": "5"}, headers=bearer("RWAK-demo-key")
    ) as resp:
        body = await resp.json()
    assert resp.status == 200
    assert (body["success"], body["workspace"], body["page"], body["size"]) == (True, WS, 2, 5)
    assert body["data"]
    assert api.fake.login_calls == 0


async def test_echo_reports_the_raw_path_with_encoded_slash_and_repeated_query_params(
    start: Start,
) -> None:
    api = await start()
    path = "/echo/a%2Fb/c?x=1&x=2&q=hello%20world"
    body = os.urandom(200_000)
    async with api.session.put(
        URL(f"{api.url}{path}", encoded=True),  # encoded=True: yarl sends the path untouched
        data=body,
        headers={**bearer("RWAK-demo-key"), "x-tenant-id": "t1"},
    ) as resp:
        echo = await resp.json()
    assert echo["method"] == "PUT"
    assert echo["raw_path"] == path
    assert echo["workspace"] == WS
    assert echo["body_len"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert ["x-tenant-id", "t1"] in [[k.lower(), v] for k, v in echo["headers"]]
    recorded = api.fake.requests[-1]
    assert (recorded.method, recorded.raw_path, recorded.body_len) == ("PUT", path, len(body))
    assert recorded.body_sha256 == echo["body_sha256"]
    assert [list(h) for h in recorded.headers] == echo["headers"]


async def test_multipart_upload_reports_each_file_size_and_sha256(start: Start) -> None:
    api = await start()
    statement = os.urandom(3 * 1024 * 1024 + 7)
    form = aiohttp.FormData()
    form.add_field("period", "2024-01")
    form.add_field("file", io.BytesIO(statement), filename="statement.csv", content_type="text/csv")
    async with api.session.post(
        f"{api.url}/file/royalty", data=form, headers=bearer("RWAK-demo-key")
    ) as resp:
        body = await resp.json()
    assert resp.status == 200
    assert body["files"] == [
        {
            "field": "period",
            "filename": None,
            "size": 7,
            "sha256": hashlib.sha256(b"2024-01").hexdigest(),
        },
        {
            "field": "file",
            "filename": "statement.csv",
            "size": len(statement),
            "sha256": hashlib.sha256(statement).hexdigest(),
        },
    ]
    recorded = api.fake.requests[-1]
    assert recorded.body_len > len(statement)
    assert recorded.body_sha256 is None


@pytest.mark.parametrize("path", ["/file/f-1/download", "/royalty/download/csv"])
async def test_downloads_stream_exactly_size_bytes_of_the_csv_that_csv_bytes_yields(
    start: Start, path: str
) -> None:
    api = await start()
    size = 1_000_003
    digest = hashlib.sha256()
    async with api.session.get(
        f"{api.url}{path}", params={"size": str(size)}, headers=bearer("RWAK-demo-key")
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/csv"
        assert resp.content_length == size
        received = 0
        async for chunk in resp.content.iter_chunked(65536):
            digest.update(chunk)
            received += len(chunk)
    expected = hashlib.sha256(b"".join(csv_bytes(size))).hexdigest()
    assert (received, digest.hexdigest()) == (size, expected)


def test_csv_bytes_yields_exact_sizes_in_chunks_of_at_most_64_kib() -> None:
    for size in (0, 5, 65536, 65537, 200_000):
        chunks = list(csv_bytes(size))
        assert sum(map(len, chunks)) == size
        assert all(len(c) <= 65536 for c in chunks)
    assert b"".join(csv_bytes(200)).startswith(b"row,isrc,")
    assert b"".join(csv_bytes(300))[:200] == b"".join(csv_bytes(200))


async def test_sse_with_a_gate_delivers_each_event_only_when_released(start: Start) -> None:
    api = await start()
    gate: asyncio.Queue[None] = asyncio.Queue()
    api.fake.sse_gate = gate

    async def next_event(stream: aiohttp.StreamReader) -> str:
        lines = []
        while (line := await stream.readline()) != b"\n":
            lines.append(line.decode().rstrip("\n"))
        return "\n".join(lines)

    async with api.session.post(
        f"{api.url}/ai/chat", params={"n": "3"}, headers=bearer("RWAK-demo-key")
    ) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        for index in range(3):
            pending = asyncio.ensure_future(next_event(resp.content))
            await asyncio.sleep(0.02)
            assert not pending.done()  # nothing arrives before the gate opens
            gate.put_nowait(None)
            event = await asyncio.wait_for(pending, 2)
            data = json.loads(event.splitlines()[-1].removeprefix("data: "))
            assert data["index"] == index
        assert (await asyncio.wait_for(next_event(resp.content), 2)).startswith("event: done")


async def test_status_endpoint_answers_the_asked_status_with_location_on_redirects(
    start: Start,
) -> None:
    api = await start()
    async with api.session.get(
        f"{api.url}/status/302", headers=bearer("RWAK-demo-key"), allow_redirects=False
    ) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "https://elsewhere.example/x"
    async with api.session.get(f"{api.url}/status/503", headers=bearer("RWAK-demo-key")) as resp:
        assert resp.status == 503
        assert (await resp.json())["success"] is False


async def test_injected_login_and_authtoken_failures_are_answered_in_order_then_recover(
    start: Start,
) -> None:
    api = await start()
    api.fake.login_failures = [(503, None), (429, 7.0)]
    first, second = await api.login(), await api.login()
    assert (first.status, "Retry-After" in first.headers) == (503, False)
    assert (second.status, second.headers["Retry-After"]) == (429, "7")
    refresh = await api.refresh_token()

    api.fake.authtoken_failures = [(500, None)]
    assert (await api.authtoken(refresh)).status == 500
    assert (await api.authtoken(refresh)).status == 200
    assert api.fake.login_calls == 3
    assert api.fake.authtoken_calls[WS] == 2


async def test_unknown_paths_get_the_envelope_too(start: Start) -> None:
    api = await start()
    async with api.session.get(f"{api.url}/nope", headers=bearer("RWAK-demo-key")) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "NOT_FOUND"
