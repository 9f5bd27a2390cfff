"""The admin listener: health, readiness, metrics, token status and an opt-in quit endpoint.

It is a separate listener from the proxy's, so that Kubernetes can probe and Prometheus scrape on
``0.0.0.0:9090`` while the proxy itself stays on loopback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from proxy.config import Config
from proxy.errors import ERROR_HEADER, envelope

if TYPE_CHECKING:
    from proxy.tokens.manager import TokenManager


class AdminTarget(Protocol):
    """What the admin endpoints need from the running proxy."""

    registry: CollectorRegistry
    enable_quit: bool

    @property
    def config(self) -> Config:
        """The running configuration: which upstreams ``/tokens`` lists."""
        ...

    @property
    def managers(self) -> Mapping[str, TokenManager]:
        """Each upstream's token manager, by upstream name (none for ``auth: none``)."""
        ...

    def readiness(self) -> list[str]:
        """Why the proxy is not ready; empty when it is."""
        ...

    def readiness_notes(self) -> list[str]:
        """Conditions worth knowing that do not make the proxy unready (a degraded store)."""
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
    return _json(token_document(request.app[TARGET]))


def token_document(target: AdminTarget) -> dict[str, Any]:
    """The ``/tokens`` document: each upstream's credential and tokens by state, fingerprint and
    times; never a token, refresh token or password."""
    upstreams: list[dict[str, Any]] = []
    for up in target.config.upstreams:
        manager = target.managers.get(up.name)
        entry: dict[str, Any] = {"name": up.name, "auth": up.auth_type, "tokens": []}
        if manager is not None:
            cred = manager.source.credential_status()
            if cred is not None:
                entry["credential"] = {
                    "kind": cred.kind,
                    "fingerprint": cred.fingerprint,
                    "expires_at": iso(cred.wall_expires_at),
                    "renewable": cred.renewable,
                    "last_error": cred.last_error,
                }
            entry["tokens"] = [
                {
                    "workspace": s.key,
                    "state": s.state,
                    "fingerprint": s.fingerprint,
                    "expires_in": s.expires_in,
                    "expires_at": iso(s.wall_expires_at),
                    "fetched_at": iso(s.fetched_wall),
                    "next_refresh_in": s.next_refresh_in,
                    "consecutive_failures": s.consecutive_failures,
                    "last_error": s.last_error,
                    "pinned": s.pinned,
                    "idle_for": s.idle_for,
                }
                for s in manager.states()
            ]
        upstreams.append(entry)
    return {"ready": not target.readiness(), "upstreams": upstreams}


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
