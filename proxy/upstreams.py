"""One upstream, opened from its configuration: its TLS contexts, connection pools, token source
and manager, and the :class:`~proxy.forward.Route` requests take to it.

:class:`~proxy.app.Proxy` opens every upstream at start-up, and the changed ones again on reload;
each :class:`Upstream` owns what was opened for it in one ``AsyncExitStack``, so that replacing or
removing an upstream closes exactly that.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from proxy import readtimeout
from proxy.clock import Clock
from proxy.config import (
    Config,
    NoAuth,
    OAuth2Auth,
    RoyaltiAuth,
    StaticAuth,
    TLSSettings,
    UpstreamConfig,
    read_secret_file,
)
from proxy.direct import can_send_directly
from proxy.egress import client_session
from proxy.forward import ExactHeadersRequest, Route, fresh_session
from proxy.metrics import TokenMetrics
from proxy.tokens.manager import TokenManager
from proxy.tokens.shared import LOCAL, CredentialStore, account_of, share, shared_credential
from proxy.tokens.source import SINGLE_KEY, FetchObserver, TokenSource, ignore
from proxy.tokens.sources.royalti import RoyaltiSource
from proxy.tokens.sources.static import StaticSource

if TYPE_CHECKING:
    from proxy.store.base import SharedStore


def ssl_context(tls: TLSSettings, *, extra_ca: str | None = None) -> ssl.SSLContext | bool:
    """The TLS settings of one upstream: verification on unless switched off explicitly.
    ``extra_ca`` is trusted too: the CA of an egress proxy that intercepts TLS.

    ``True`` when the settings are the defaults (the system's CAs, no client certificate,
    verification on, no extra CA): aiohttp's own verified context, which it builds once when
    it is imported (``ssl.create_default_context()``, hostname checked). Building another per
    upstream would load the system's CA bundle again, about 0.75 MiB each
    (docs/performance.md)."""
    if tls.ca_file is None and tls.cert_file is None and tls.verify and not extra_ca:
        return True
    ctx = ssl.create_default_context(cafile=tls.ca_file)
    if extra_ca:
        ctx.load_verify_locations(cafile=extra_ca)
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
    tls: ssl.SSLContext | bool,
    config: Config,
    observer_for: Callable[[str], FetchObserver] = lambda kind: ignore,
    credential: CredentialStore = LOCAL,
) -> TokenSource | None:
    """The token source an upstream's ``auth`` section describes (None for ``type: none``).

    ``observer_for(kind)`` is told about the source's token-endpoint calls; ``credential`` is
    where a source with a refresh credential keeps it."""
    auth = up.auth
    context = tls if isinstance(tls, ssl.SSLContext) else None  # None: the verified default
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
            base_url=auth.auth_url or up.url,
            email=auth.email,
            password=auth.password,
            refresh_token=refresh.load if refresh is not None else None,
            user_id=auth.user_id,
            session=session,
            clock=clock,
            timeout=up.timeouts.token,
            ssl_context=context,
            min_backoff=config.tokens.min_backoff,
            max_backoff=config.tokens.max_backoff,
            upstream=up.name,
            observer=observer_for(RoyaltiSource.kind),
            credential=credential,
        )
    if isinstance(auth, StaticAuth):
        ref = auth.token
        return StaticSource(
            kind="static", value=ref.value, path=ref.path, read_file=read_secret_file, clock=clock
        )
    if isinstance(auth, OAuth2Auth):
        from proxy.tokens.sources.oauth2 import OAuth2Source

        return OAuth2Source(
            settings=auth,
            timeout=up.timeouts.token,
            session=session,
            clock=clock,
            ssl_context=context,
            observer=observer_for(f"oauth2_{auth.grant}"),
            credential=credential,
        )
    assert isinstance(auth, NoAuth)
    return None


@dataclass(slots=True, eq=False)
class Upstream:
    """One upstream's resources, closed together when the upstream is replaced or removed."""

    config: UpstreamConfig
    route: Route
    manager: TokenManager | None
    stack: contextlib.AsyncExitStack


async def open_upstream(
    up: UpstreamConfig,
    cfg: Config,
    *,
    clock: Clock,
    store: SharedStore | None,
    metrics: TokenMetrics,
) -> Upstream:
    """Everything one upstream needs: its connection pools, token source and manager. Tokens
    are shared through ``store`` when there is one; token-endpoint calls are counted in
    ``metrics``."""
    stack = contextlib.AsyncExitStack()
    try:
        tls = ssl_context(up.tls, extra_ca=up.egress.ca_file)
        token_setting = up.token_egress or up.egress
        token_tls = (
            tls
            if token_setting.ca_file == up.egress.ca_file
            else ssl_context(up.tls, extra_ca=token_setting.ca_file)
        )
        connector = aiohttp.TCPConnector(
            limit=up.max_connections, ssl=tls, keepalive_timeout=up.keepalive_timeout
        )
        readtimeout.install(connector)  # timeouts.read without a timer per chunk
        session = await stack.enter_async_context(
            # The egress proxy, resolved at load, is the session's default for every
            # request and WebSocket handshake.
            client_session(
                up.proxy,
                connector=connector,
                auto_decompress=False,  # bytes pass through as the upstream sent them
                request_class=ExactHeadersRequest,  # headers as the client sent them
                # Never keep one client's cookies to send them with another's requests.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        )
        fresh = await stack.enter_async_context(
            fresh_session(limit=up.max_connections, tls=tls, egress=up.proxy)
        )
        token_session = await stack.enter_async_context(
            client_session(
                up.token_proxy,
                connector=aiohttp.TCPConnector(limit=10, ssl=token_tls),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        )
        account = account_of(up) if store is not None else None
        credential: CredentialStore = LOCAL
        if store is not None and account is not None:
            credential = shared_credential(
                store=store, upstream=up.name, account=account, clock=clock
            )
        source = build_source(
            up,
            session=token_session,
            clock=clock,
            tls=token_tls,
            config=cfg,
            observer_for=lambda kind: metrics.observer(up.name, kind),
            credential=credential,
        )
        if source is not None and store is not None and account is not None:
            source = share(source, store=store, upstream=up.name, account=account, clock=clock)
        manager: TokenManager | None = None
        if source is not None:
            manager = TokenManager(
                upstream=up.name,
                source=source,
                clock=clock,
                settings=cfg.tokens,
            )
            stack.push_async_callback(manager.close)
    except BaseException:
        await stack.aclose()
        raise
    ra = up.auth if isinstance(up.auth, RoyaltiAuth) else None
    per_ws = source is not None and source.per_workspace
    timeout = aiohttp.ClientTimeout(
        total=None, connect=up.timeouts.connect, sock_read=up.timeouts.read
    )
    route = Route(
        name=up.name,
        prefix=up.path_prefix.rstrip("/"),
        base_url=up.url,
        session=session,
        fresh_session=fresh,
        timeout=timeout,
        direct=can_send_directly(session, timeout) and can_send_directly(fresh, timeout),
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
        max_concurrent=up.max_concurrent,
        max_body_size=up.max_body_size,
        egress_proxy=up.proxy.url if up.proxy is not None else None,
        also_drop=frozenset({cfg.inbound.shared_secret_header})
        if cfg.inbound.shared_secret is not None
        else frozenset(),
    )
    if manager is not None:
        # Fetched now, so that readiness never waits for traffic.
        if per_ws and route.default_workspace:
            manager.pin([route.default_workspace])
        elif not per_ws:
            manager.pin([SINGLE_KEY])
    return Upstream(config=up, route=route, manager=manager, stack=stack)


async def close_upstreams(ups: list[Upstream]) -> None:
    """Close ``ups`` (their sessions, token managers and sources), one after the other."""
    for up in ups:
        await up.stack.aclose()
