"""The reference the proxy is measured against: the least an aiohttp forwarder can do. One
ClientSession (100 connections, as the proxy's default); method, raw path, headers (less Host and
hop-by-hop) and body forwarded; the response streamed back. No tokens, no metrics, no errors
handled. The event loop the bench names in ``ROYALTI_PROXY_LOOP``, the proxy's beside it:
``asyncio``, or uvloop (when installed) for ``uvloop`` or ``auto``.

    python bench/bare_forwarder.py PORT UPSTREAM_URL
"""

import asyncio
import contextlib
import os
import sys

import aiohttp
from aiohttp import web
from yarl import URL

HOP = {"host", "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}


async def main(port: int, upstream: str) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as session:

        async def forward(req: web.BaseRequest) -> web.StreamResponse:
            url = URL(upstream + req.raw_path, encoded=True)
            headers = [(k, v) for k, v in req.headers.items() if k.lower() not in HOP]
            body = req.content if req.body_exists else None
            async with session.request(
                req.method, url, headers=headers, data=body, allow_redirects=False
            ) as up:
                out = web.StreamResponse(status=up.status, reason=up.reason)
                out.headers.extend((k, v) for k, v in up.headers.items() if k.lower() not in HOP)
                await out.prepare(req)
                async for chunk in up.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out

        runner = web.ServerRunner(web.Server(forward, auto_decompress=False, access_log=None))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()


if __name__ == "__main__":
    factory = None
    if os.environ.get("ROYALTI_PROXY_LOOP", "auto") != "asyncio":
        with contextlib.suppress(ImportError):
            import uvloop

            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as r:
        r.run(main(int(sys.argv[1]), sys.argv[2].rstrip("/")))
