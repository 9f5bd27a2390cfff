"""Wiring: turn a :class:`~proxy.config.Config` into running listeners.

:class:`Proxy` owns every resource (client sessions, token managers, listeners) through one
``AsyncExitStack``, so a start-up that fails half-way releases what it had already opened.
"""

from __future__ import annotations

import contextlib
import logging
import ssl

import aiohttp
from aiohttp import web

from proxy.clock import Clock, SystemClock
from proxy.config import (
    Address,
    Config,
    NoAuth,
    OAuth2Auth,
    RoyaltiAuth,
    StaticAuth,
    TLSSettings,
    UpstreamConfig,
    read_secret_file,
)
from proxy.forward import Forwarder, Route, Router
from proxy.tokens.manager import ManagerSettings, TokenManager
from proxy.tokens.source import TokenSource
from proxy.tokens.sources.royalti import RoyaltiSource
from proxy.tokens.sources.static import StaticSource

log = logging.getLogger("proxy")


def ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """The TLS settings of one upstream: verification on unless switched off explicitly."""
    ctx = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def build_source(
    up: UpstreamConfig,
    *,
    session: aiohttp.ClientSession,
    clock: Clock,
    tls: ssl.SSLContext,
    config: Config,
) -> TokenSource | None:
    """The token source an upstream's ``auth`` section describes (None for ``type: none``)."""
    auth = up.auth
    if isinstance(auth, RoyaltiAuth):
        if auth.api_key is not None:
            ref = auth.api_key
            return StaticSource(
                kind="api_key",
                value=ref.value,
                path=ref.path,
                read_file=read_secret_file,
                clock=clock,
            )
        refresh = auth.refresh_token
        return RoyaltiSource(
            base_url=up.url,
            email=auth.email,
            password=auth.password,
            refresh_token=refresh.load if refresh is not None else None,
            user_id=auth.user_id,
            session=session,
            clock=clock,
            timeout=up.timeouts.token,
            ssl_context=tls,
            min_backoff=config.tokens.min_backoff,
            max_backoff=config.tokens.max_backoff,
            upstream=up.name,
        )
    if isinstance(auth, StaticAuth):
        ref = auth.token
        return StaticSource(
            kind="static", value=ref.value, path=ref.path, read_file=read_secret_file, clock=clock
        )
    if isinstance(auth, OAuth2Auth):
        from proxy.tokens.sources.oauth2 import OAuth2Source

        return OAuth2Source(
            grant=auth.grant,
            token_url=auth.token_url,
            client_id=auth.client_id,
            client_secret=auth.client_secret,
            client_auth=auth.client_auth,
            username=auth.username,
            password=auth.password,
            scope=auth.scope,
            extra_params=auth.extra_params,
            extra_headers=auth.extra_headers,
            default_lifetime=auth.default_lifetime,
            timeout=up.timeouts.token,
            session=session,
            clock=clock,
            ssl_context=tls,
        )
    assert isinstance(auth, NoAuth)
    return None


class Proxy:
    """The running proxy: listeners, routes, token managers."""

    def __init__(self, config: Config, *, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.managers: dict[str, TokenManager] = {}
        self.routes: list[Route] = []
        self.forwarder: Forwarder | None = None
        self.addresses: dict[str, str] = {}
        """Listener name -> URL it is reachable at (``http://127.0.0.1:PORT``)."""
        self._stack = contextlib.AsyncExitStack()
        self._runner: web.BaseRunner | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise

    async def _start(self) -> None:
        cfg = self.config
        settings = ManagerSettings(
            idle_timeout=cfg.tokens.idle_timeout,
            max_entries=cfg.tokens.max_entries,
            min_backoff=cfg.tokens.min_backoff,
            max_backoff=cfg.tokens.max_backoff,
        )
        for up in cfg.upstreams:
            tls = ssl_context(up.tls)
            session = await self._stack.enter_async_context(
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=up.max_connections, ssl=tls),
                    auto_decompress=False,  # bytes pass through as the upstream sent them
                    # Never keep one client's cookies to send them with another's requests.
                    cookie_jar=aiohttp.DummyCookieJar(),
                )
            )
            token_session = await self._stack.enter_async_context(
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=10, ssl=tls),
                    cookie_jar=aiohttp.DummyCookieJar(),
                )
            )
            source = build_source(up, session=token_session, clock=self.clock, tls=tls, config=cfg)
            manager: TokenManager | None = None
            if source is not None:
                manager = TokenManager(
                    upstream=up.name, source=source, clock=self.clock, settings=settings
                )
                self._stack.push_async_callback(manager.close)
                self.managers[up.name] = manager
            ra = up.auth if isinstance(up.auth, RoyaltiAuth) else None
            per_ws = source is not None and source.per_workspace
            route = Route(
                name=up.name,
                prefix=up.path_prefix.rstrip("/"),
                base_url=up.url,
                session=session,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=up.timeouts.connect, sock_read=up.timeouts.read
                ),
                manager=manager,
                per_workspace=per_ws,
                default_workspace=ra.default_workspace if ra else None,
                allowed_workspaces=ra.allowed_workspaces if ra else frozenset(),
                # Removed before forwarding even when the credential ignores it (an API key).
                workspace_header=ra.workspace_header if ra else None,
                inject_header=up.inject.header,
                inject_format=up.inject.format,
                replay_on=up.replay_on,
                replay_max_body=up.replay_max_body,
            )
            self.routes.append(route)
            if manager is not None:
                if per_ws and route.default_workspace:
                    manager.pin([route.default_workspace])
                elif not per_ws:
                    manager.pin(["-"])
        self.forwarder = Forwarder(Router(self.routes), access_log_enabled=cfg.access_log)
        server = web.Server(
            self.forwarder,
            handler_cancellation=True,  # a client that goes away cancels its upstream request
            auto_decompress=False,  # request bodies pass through as the client sent them
            access_log=None,
        )
        runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=cfg.shutdown_timeout
        )
        await runner.setup()
        self._runner = runner
        self._stack.push_async_callback(runner.cleanup)
        self.addresses["proxy"] = await _listen(runner, cfg.listen)
        log.info(
            "proxy listening",
            extra={
                "event": "started",
                "listen": self.addresses["proxy"],
                "upstreams": [u.name for u in cfg.upstreams],
                "config": cfg.source,
            },
        )

    async def stop(self) -> None:
        await self._stack.aclose()

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _listen(runner: web.BaseRunner, addr: Address) -> str:
    site: web.BaseSite
    if addr.unix is not None:
        site = web.UnixSite(runner, addr.unix)
        await site.start()
        return f"unix:{addr.unix}"
    site = web.TCPSite(runner, addr.host, addr.port)
    await site.start()
    port = runner.addresses[-1][1]  # the bound port, when 0 was asked for
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    return f"http://{host}:{port}"
