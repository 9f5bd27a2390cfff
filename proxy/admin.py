"""The admin listener: health, readiness, metrics, token status and an opt-in quit endpoint.

It is a separate listener from the proxy's, so that Kubernetes can probe and Prometheus scrape on
``0.0.0.0:9090`` while the proxy itself stays on loopback.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from proxy.errors import ERROR_HEADER, envelope


class AdminTarget(Protocol):
    """What the admin endpoints need from the running proxy."""

    registry: CollectorRegistry
    enable_quit: bool

    def readiness(self) -> list[str]:
        """Why the proxy is not ready; empty when it is."""
        ...

    def readiness_notes(self) -> list[str]:
        """Conditions worth knowing that do not make the proxy unready (a degraded store)."""
        ...

    def token_status(self) -> dict[str, Any]:
        """The token-status document: never a token, refresh token or password."""
        ...

    def request_quit(self) -> None: ...


TARGET: web.AppKey[AdminTarget] = web.AppKey("admin_target", AdminTarget)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data, indent=2).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def livez(request: web.Request) -> web.Response:
    # Answering at all proves the event loop runs.
    return _json({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    target = request.app[TARGET]
    reasons = target.readiness()
    notes = target.readiness_notes()
    if reasons:
        return _json({"status": "not ready", "reasons": reasons + notes}, status=503)
    return _json({"status": "ready", "reasons": notes})


async def metrics(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[TARGET].registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def tokens(request: web.Request) -> web.Response:
    return _json(request.app[TARGET].token_status())


async def quitquitquit(request: web.Request) -> web.Response:
    target = request.app[TARGET]
    if not target.enable_quit:
        return web.Response(
            status=404,
            body=envelope("QUIT_DISABLED", "POST /quitquitquit is off (admin.enable_quit)"),
            headers={ERROR_HEADER: "QUIT_DISABLED", "Content-Type": "application/json"},
        )
    target.request_quit()
    return _json({"status": "shutting down"}, status=202)


def build_admin(target: AdminTarget) -> web.Application:
    app = web.Application()
    app[TARGET] = target
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/tokens", tokens)
    app.router.add_post("/quitquitquit", quitquitquit)
    return app


def iso(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 UTC, for humans reading ``/tokens``."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
