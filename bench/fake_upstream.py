"""The fake Royalti API (:class:`proxy.fakes.royalti.FakeRoyalti`) in a process of its own, with a
second, bench-only listener that reports what the fake saw.

    python bench/fake_upstream.py PORT CONTROL_PORT [--access-lifetime S] [--workspaces N]

Control listener (never proxied):

* ``GET /counters``: ``{"login_calls", "authtoken_calls": {workspace: n}, "api_calls",
  "expired_seen", "unauthorized"}``.
* ``GET /token?workspace=W&lifetime=S``: an access token the fake accepts, minted with its own
  key, for clients that talk to it without the proxy (the bare forwarder's reference runs).

The fake records every API request it receives; the bench sends a few thousand at most, so that
list is cleared on every ``/counters`` call to keep the process small.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
import warnings
from pathlib import Path

import jwt
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy.fakes.royalti import DEFAULT_SECRET, FakeRoyalti, start_fake

WORKSPACES = [f"ws-{i:02d}" for i in range(10)]


def control_app(fake: FakeRoyalti) -> web.Application:
    async def counters(request: web.Request) -> web.Response:
        fake.requests.clear()
        fake.tokens_seen.clear()
        return web.json_response(
            {
                "login_calls": fake.login_calls,
                "authtoken_calls": dict(fake.authtoken_calls),
                "api_calls": fake.api_calls,
                "expired_seen": fake.expired_seen,
                "unauthorized": fake.unauthorized,
            }
        )

    async def token(request: web.Request) -> web.Response:
        iat = int(time.time())
        claims = {
            "id": fake.user_id("ops@example.com"),
            "name": "ops@example.com",
            "activeWorkspace": request.query.get("workspace", WORKSPACES[0]),
            "iat": iat,
            "exp": iat + int(request.query.get("lifetime", "3600")),
            "jti": uuid.uuid4().hex,
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = jwt.encode(claims, DEFAULT_SECRET, algorithm="HS256")
        return web.json_response({"access_token": value})

    app = web.Application()
    app.router.add_get("/counters", counters)
    app.router.add_get("/token", token)
    return app


async def main(port: int, control_port: int, lifetime: float, workspaces: int) -> None:
    fake = FakeRoyalti(
        workspaces=[(w, f"Bench {w}") for w in WORKSPACES[:workspaces]],
        access_lifetime=lifetime,
    )
    fake_runner, _ = await start_fake(fake, "127.0.0.1", port)
    control = web.AppRunner(control_app(fake), access_log=None)
    await control.setup()
    try:
        await web.TCPSite(control, "127.0.0.1", control_port).start()
        await asyncio.Event().wait()
    finally:
        await control.cleanup()
        await fake_runner.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("control_port", type=int)
    p.add_argument("--access-lifetime", type=float, default=3600.0)
    p.add_argument("--workspaces", type=int, default=10)
    a = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(a.port, a.control_port, a.access_lifetime, a.workspaces))
