"""The fast upstream for the throughput and latency runs: as little Python as an aiohttp server
can do per request, so that the forwarder in front of it, not the upstream, is what is measured.

Every path answers 200 with a fixed JSON body shaped like a Royalti list page, except the two
Royalti token endpoints, so that a ``type: royalti`` proxy can run in front of it too:
``POST /auth/login`` (a refresh token and the workspace list) and ``GET /auth/authtoken``
(an access token for ``currentWorkspace``). Tokens are HS256 JWTs with a fixed, public test key;
nothing checks them. A request body is read and discarded.

    python bench/upstream.py PORT [--lifetime SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
import uuid

import jwt
from aiohttp import web

KEY = "bench-upstream-key-not-a-secret-0123456789"  # public test value
WORKSPACES = [f"ws-{i:02d}" for i in range(10)]
BODY = json.dumps(
    {
        "success": True,
        "page": 1,
        "size": 3,
        "data": [{"id": f"artist-{n}", "name": f"Bench artist {n}"} for n in (1, 2, 3)],
    }
).encode()


def _jwt(claims: dict[str, object], lifetime: float) -> str:
    iat = int(time.time())
    return jwt.encode(
        {**claims, "iat": iat, "exp": iat + int(lifetime), "jti": uuid.uuid4().hex},
        KEY,
        algorithm="HS256",
    )


def make_handler(lifetime: float) -> web.Server:
    async def handle(request: web.BaseRequest) -> web.Response:
        if request.body_exists:
            async for _ in request.content.iter_any():
                pass
        path = request.path
        if path == "/auth/login":
            data = {
                "refresh_token": _jwt({"name": "refresh_token", "id": "bench"}, 86400),
                "workspaces": [{"workspaceId": w, "name": w} for w in WORKSPACES],
            }
            return web.json_response(data)
        if path == "/auth/authtoken":
            ws = request.query.get("currentWorkspace", "")
            token = _jwt({"name": "bench", "activeWorkspace": ws}, lifetime)
            return web.json_response({"status": "success", "data": {"access_token": token}})
        return web.Response(body=BODY, content_type="application/json")

    return web.Server(handle, access_log=None)


async def main(port: int, lifetime: float) -> None:
    runner = web.ServerRunner(make_handler(lifetime), handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run_loop(coro: object) -> None:
    """uvloop when installed, unless ROYALTI_PROXY_LOOP=asyncio (the bench names the loop)."""
    factory = None
    if os.environ.get("ROYALTI_PROXY_LOOP", "auto") != "asyncio":
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro)  # type: ignore[arg-type]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("--lifetime", type=float, default=3600.0, help="access token lifetime, s")
    a = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(main(a.port, a.lifetime))
