"""Wiring: turn a :class:`~proxy.config.Config` into running listeners.

:class:`Proxy` owns every resource (the shared store, each upstream's client sessions and token
manager, the listeners, the file watcher) through one ``AsyncExitStack``: a start-up that fails
half-way releases what it had already opened, and stopping is one ``aclose``. Opening one
upstream lives in :mod:`proxy.upstreams`, reload in :mod:`proxy.reload`, the ``/tokens`` document
in :mod:`proxy.admin`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.admin import build_admin
from proxy.clock import Clock, SystemClock
from proxy.config import Address, Config, UpstreamConfig
from proxy.forward import Forwarder, Route, Router
from proxy.inbound import GuardedServer, InboundGuard
from proxy.metrics import ProxyCollector, TokenMetrics, TokenStoreCollector, build_info
from proxy.reload import Reloader
from proxy.store import open_store
from proxy.tokens.manager import TokenManager
from proxy.tokens.source import SINGLE_KEY
from proxy.upstreams import Upstream, close_upstreams, open_upstream

if TYPE_CHECKING:
    from proxy.store.base import SharedStore

log = logging.getLogger("proxy")
#: Connections the kernel queues until the proxy accepts them. With aiohttp's default, 128, a
#: burst of 1,000 new connections overflows the queue and the dropped ones retry only after
#: the 1 s SYN retransmission (cold start: p99 1.3 s, not 0.9 s). Capped by net.core.somaxconn.
LISTEN_BACKLOG = 1024


class Proxy:
    """The running proxy: listeners, routes, token managers, metrics."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        registry: CollectorRegistry | None = None,
        reload_source: Callable[[], Config] | None = None,
        store: SharedStore | None = None,
    ) -> None:
        """``reload_source`` loads the configuration again (on SIGHUP or a file change);
        ``store``, when given, is shared through instead of the one ``token_store`` names (the
        in-memory store of the tests); the proxy closes it when it stops."""
        self.config = config
        self.clock = clock or SystemClock()
        self.registry = registry or CollectorRegistry()
        self.enable_quit = config.admin.enable_quit
        self.managers: dict[str, TokenManager] = {}
        self.routes: list[Route] = []
        self.forwarder: Forwarder | None = None
        self.addresses: dict[str, str] = {}
        """Listener name (``proxy``, ``admin``) -> URL it is reachable at."""
        self.draining = False
        self.quit = asyncio.Event()
        """Set when ``POST /quitquitquit`` asks the process to exit."""
        self._stack = contextlib.AsyncExitStack()
        self._runner: web.BaseRunner | None = None
        self._upstreams: dict[str, Upstream] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._reloader = Reloader(self, source=reload_source, clock=self.clock)
        self._given_store = store
        self.store: SharedStore | None = None
        """The shared token store (``token_store.type: redis``), opened by :meth:`start`."""
        self._token_metrics = TokenMetrics(self.registry)
        build_info(self.registry)
        self.registry.register(
            TokenStoreCollector(store=lambda: self.store, managers=lambda: self.managers)
        )
        self.registry.register(
            ProxyCollector(
                forwarder=lambda: self.forwarder,
                routes=lambda: self.routes,
                managers=lambda: self.managers,
                ready=lambda: not self.readiness(),
                max_workspaces=config.admin.metrics_max_workspaces,
            )
        )

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise

    async def _start(self) -> None:
        # Callbacks run in reverse: the watcher stops first, then the listeners drain, then the
        # upstreams (and the retiring ones) close, the store last.
        cfg = self.config
        # Opened once for the process: token_store changes need a restart, not a reload.
        self.store = self._given_store or open_store(cfg.token_store, clock=self.clock)
        if self.store is not None:
            self._stack.push_async_callback(self.store.close)
            await self.store.ping()  # a store that is down at start-up is logged, not fatal
        self._stack.push_async_callback(self._close_upstreams)
        for up in cfg.upstreams:
            self._upstreams[up.name] = await self._open(up, cfg)
        self._install()
        admin = web.AppRunner(
            build_admin(self), handle_signals=False, access_log=None, shutdown_timeout=5.0
        )
        await admin.setup()
        self._stack.push_async_callback(admin.cleanup)
        self.addresses["admin"] = await _listen(admin, cfg.admin.listen)
        assert self.forwarder is not None
        lim = cfg.limits
        server = GuardedServer(
            self.forwarder,
            header_timeout=lim.header_timeout,
            handler_cancellation=True,  # a client that goes away cancels its upstream request
            auto_decompress=False,  # request bodies pass through as the client sent them
            access_log=None,
            keepalive_timeout=lim.idle_timeout,
            max_line_size=lim.max_header_size,
            max_field_size=lim.max_header_size,
            max_headers=lim.max_headers,
        )
        runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=cfg.shutdown_timeout
        )
        await runner.setup()
        self._runner = runner
        self._stack.push_async_callback(runner.cleanup)
        self.addresses["proxy"] = await _listen(runner, cfg.listen)
        if cfg.listen.unix is not None:
            os.chmod(cfg.listen.unix, cfg.inbound.unix_socket_mode)
        if cfg.inbound.allow_unauthenticated and not cfg.listen.is_loopback:
            log.warning(
                "the proxy listens on a non-loopback address with NO inbound guard: anyone who "
                "can reach it can use its credentials",
                extra={"event": "unguarded", "listen": str(cfg.listen)},
            )
        await self._stack.enter_async_context(self._reloader.watch())
        # What start-up allocated lives as long as the process: frozen, the cyclic garbage
        # collector stops scanning it over and over under load (2-4 % more throughput).
        gc.collect()
        gc.freeze()
        log.info(
            "proxy listening",
            extra={
                "event": "started",
                "listen": self.addresses["proxy"],
                "admin": self.addresses["admin"],
                "upstreams": [u.name for u in cfg.upstreams],
                "config": cfg.source,
                # The loop that runs, whatever chose it (event_loop or ROYALTI_PROXY_LOOP).
                "event_loop": loop_name(asyncio.get_running_loop()),
            },
        )

    async def stop(self) -> None:
        """Graceful: readiness turns 503, the listener stops accepting, requests in flight get
        ``shutdown_timeout`` to finish, then everything is closed."""
        self.draining = True
        in_flight = self.forwarder.in_flight if self.forwarder else 0
        log.info("draining", extra={"event": "draining", "in_flight": in_flight})
        cancelled_before = self.forwarder.cancelled if self.forwarder else 0
        await self._stack.aclose()
        cut = (self.forwarder.cancelled if self.forwarder else 0) - cancelled_before
        if cut:
            log.warning(
                "requests still in flight at shutdown_timeout were cancelled",
                extra={"event": "shutdown_cancelled", "cancelled": cut},
            )

    # -- upstreams ----------------------------------------------------------------------------

    async def _open(self, up: UpstreamConfig, cfg: Config) -> Upstream:
        return await open_upstream(
            up, cfg, clock=self.clock, store=self.store, metrics=self._token_metrics
        )

    def _install(self) -> None:
        """Make the current upstreams the ones requests are routed to."""
        ups = list(self._upstreams.values())
        self.routes = [u.route for u in ups]
        self.managers = {u.config.name: u.manager for u in ups if u.manager is not None}
        router = Router(self.routes)
        if self.forwarder is None:
            self.forwarder = Forwarder(
                router, access_log_enabled=self.config.access_log, guard=self._guard()
            )
        else:
            self.forwarder.router = router
            self.forwarder.access_log = self.config.access_log
            self.forwarder.guard = self._guard()

    def _guard(self) -> InboundGuard | None:
        inbound = self.config.inbound
        secret = inbound.shared_secret.load().reveal().encode() if inbound.shared_secret else None
        if not inbound.allowed_cidrs and secret is None:
            return None
        return InboundGuard(
            networks=inbound.allowed_cidrs, secret=secret, header=inbound.shared_secret_header
        )

    async def _close_upstreams(self) -> None:
        """Close every upstream, the running ones and those still retiring after a reload."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await close_upstreams(list(self._upstreams.values()))

    async def _retire(self, ups: list[Upstream]) -> None:
        """Close replaced upstreams once the requests they are serving have finished."""
        # Real time, not the injectable clock: this waits for real requests to finish. Polling
        # keeps the per-request path free of an Event to set.
        deadline = time.monotonic() + self.config.shutdown_timeout
        try:
            while any(u.route.in_flight for u in ups) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        finally:  # at shutdown too, when this wait is cancelled
            await close_upstreams(ups)

    # -- reload -------------------------------------------------------------------------------

    async def reload(self, config: Config | None = None) -> bool:
        """Apply a new configuration (by default, loaded again) without dropping requests in
        flight; see :mod:`proxy.reload`. False when it is rejected and the running one kept."""
        return await self._reloader.reload(config)

    async def apply(self, config: Config) -> bool:
        """Upstreams whose settings (secrets included) did not change keep their tokens and
        connections; changed ones get new ones, and the old ones are closed once the requests
        using them have finished."""
        old = self.config
        keep = {
            u.name: self._upstreams[u.name]
            for u in config.upstreams
            if u.name in self._upstreams
            and self._upstreams[u.name].config == u
            and old.tokens == config.tokens
        }
        fresh: dict[str, Upstream] = {}
        try:
            for up in config.upstreams:
                if up.name not in keep:
                    fresh[up.name] = await self._open(up, config)
        except Exception as exc:
            await close_upstreams(list(fresh.values()))
            log.error(
                "new configuration could not be applied; keeping the running one",
                extra={"event": "reload_rejected", "error": str(exc)},
            )
            return False
        replaced = [u for name, u in self._upstreams.items() if name not in keep]
        self._upstreams = {up.name: keep.get(up.name) or fresh[up.name] for up in config.upstreams}
        self.config = config
        self.enable_quit = config.admin.enable_quit
        self._install()
        if replaced:
            task = asyncio.ensure_future(self._retire(replaced))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        log.info(
            "configuration reloaded",
            extra={
                "event": "reloaded",
                "kept": sorted(keep),
                "renewed": sorted(fresh),
                "removed": sorted(u.config.name for u in replaced if u.config.name not in fresh),
            },
        )
        return True

    # -- what the admin endpoints show --------------------------------------------------------

    def readiness(self) -> list[str]:
        """Why the proxy cannot serve every upstream now; empty when it can."""
        if self.draining:
            return ["shutting down"]
        reasons: list[str] = []
        for route in self.routes:
            manager = route.manager
            if manager is None:
                continue
            key = route.default_workspace if route.per_workspace else SINGLE_KEY
            if key is None:
                continue  # no default workspace: nothing to hold ready before traffic names one
            if manager.peek(key) is None:
                state = next((s for s in manager.states() if s.key == key), None)
                error = f" (last error: {state.last_error})" if state and state.last_error else ""
                what = f"default workspace {key}" if route.per_workspace else "its credential"
                reasons.append(f"upstream {route.name}: no valid token for {what}{error}")
        return reasons

    def readiness_notes(self) -> list[str]:
        note = self.store.status_note() if self.store is not None else None
        return [note] if note else []

    def request_quit(self) -> None:
        log.info("quit requested", extra={"event": "quit_requested"})
        self.quit.set()

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _listen(runner: web.BaseRunner, addr: Address) -> str:
    site: web.BaseSite
    if addr.unix is not None:
        site = web.UnixSite(runner, addr.unix, backlog=LISTEN_BACKLOG)
        await site.start()
        return f"unix:{addr.unix}"
    site = web.TCPSite(runner, addr.host, addr.port, backlog=LISTEN_BACKLOG)
    await site.start()
    port = runner.addresses[-1][1]  # the bound port, when 0 was asked for
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    return f"http://{host}:{port}"


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: which implementation ``loop`` is."""
    return "uvloop" if type(loop).__module__.partition(".")[0] == "uvloop" else "asyncio"
