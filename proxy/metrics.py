"""Prometheus metrics, all prefixed ``royalti_proxy_``, on an injected ``CollectorRegistry``.

Two kinds of source:

* Token-endpoint calls are rare: they are counted with ordinary prometheus-client metrics whose
  label children are bound once per upstream.
* Everything on the per-request path (requests, durations, cache hits, waits, replays, errors)
  is kept in plain ints, dicts and :class:`FastHistogram` buckets by the code that handles the
  request, and turned into metric families only when Prometheus scrapes, by
  :class:`ProxyCollector`. A request never touches a metric object or a lock.

The workspace label is bounded: pinned (default) workspaces and the ``max_workspaces`` most
recently used ones are named, the rest are folded into ``workspace="other"``.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.tokens.entry import TokenState
from proxy.tokens.manager import TokenManager
from proxy.tokens.shared import OUTCOMES, SharedSource

if TYPE_CHECKING:
    from proxy.store.base import SharedStore

PREFIX = "royalti_proxy"
# The *_created series double the series count for no use on a sidecar's dashboards.
disable_created_metrics()  # type: ignore[no-untyped-call]
#: Upstream latency buckets, seconds: a localhost fake answers in well under a millisecond,
#: a royalty-statement upload can take minutes.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
FETCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Token-endpoint call kinds per source kind, so their series exist from the start.
FETCH_KINDS = {
    "royalti": ("login", "access"),
    "oauth2_password": ("password", "refresh"),
    "oauth2_client_credentials": ("client_credentials",),
}


class FastHistogram:
    """Histogram buckets kept in a list: one bisect and two additions per observation."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = DURATION_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs as Prometheus wants them."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else _fmt(bound), float(total)))
        return out


def _fmt(bound: float) -> str:
    return repr(float(bound))


class RouteStats:
    """One upstream's per-request counters, updated by the forwarder without any lock."""

    __slots__ = ("duration", "egress_errors", "replays", "requests", "stale_retries")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.duration = FastHistogram()
        self.replays = 0
        self.stale_retries = 0
        self.egress_errors = 0

    def record(self, method: str, status: int) -> None:
        key = (method if method in METHODS else "OTHER", status)
        self.requests[key] = self.requests.get(key, 0) + 1


class RouteCounters(Protocol):
    """What :class:`ProxyCollector` reads of one upstream's route (:class:`proxy.forward.Route`):
    its name and its counters. A protocol, so that metrics never imports the forwarder that
    updates them."""

    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> RouteStats: ...


class ListenerCounters(Protocol):
    """What :class:`ProxyCollector` reads of the proxy listener's request handler
    (:class:`proxy.forward.Forwarder`): requests in flight and the errors it answered, by code."""

    @property
    def in_flight(self) -> int: ...

    @property
    def errors(self) -> Mapping[str, int]: ...


class TokenMetrics:
    """The token-endpoint metrics; :meth:`observer` gives the callback a source reports to."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.fetches = Counter(
            f"{PREFIX}_token_fetches",
            "Calls to token endpoints, by kind (login, access, refresh, password, "
            "client_credentials) and outcome (success or an error code).",
            ["upstream", "kind", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            f"{PREFIX}_token_fetch_duration_seconds",
            "Time taken by calls to token endpoints.",
            ["upstream", "kind"],
            buckets=FETCH_BUCKETS,
            registry=registry,
        )

    def observer(self, upstream: str, source_kind: str) -> Callable[[str, str, float], None]:
        kinds = FETCH_KINDS.get(source_kind, ())
        durations = {k: self.duration.labels(upstream, k) for k in kinds}
        successes = {k: self.fetches.labels(upstream, k, "success") for k in kinds}

        def observe(kind: str, outcome: str, seconds: float) -> None:
            if outcome == "success" and kind in successes:
                successes[kind].inc()
            else:
                self.fetches.labels(upstream, kind, outcome).inc()
            (durations.get(kind) or self.duration.labels(upstream, kind)).observe(seconds)

        return observe


def build_info(registry: CollectorRegistry) -> None:
    g = Gauge(
        f"{PREFIX}_build_info",
        "Always 1; the labels say which build is running.",
        ["version", "python_version"],
        registry=registry,
    )
    g.labels(__version__, platform.python_version()).set(1)


class ProxyCollector(Collector):
    """Reads the proxy's plain counters and token states at scrape time."""

    def __init__(
        self,
        *,
        forwarder: Callable[[], ListenerCounters | None],
        routes: Callable[[], Iterable[RouteCounters]],
        managers: Callable[[], dict[str, TokenManager]],
        ready: Callable[[], bool],
        max_workspaces: int = 20,
    ) -> None:
        self._forwarder = forwarder
        self._routes = routes
        self._managers = managers
        self._ready = ready
        self._max_workspaces = max_workspaces

    def collect(self) -> Iterator[Metric]:
        yield from self._requests()
        yield from self._tokens()
        ready = GaugeMetricFamily(
            f"{PREFIX}_ready", "1 when every upstream can serve (what /readyz says)."
        )
        ready.add_metric([], 1.0 if self._ready() else 0.0)
        yield ready

    def _requests(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            f"{PREFIX}_requests",
            "Requests forwarded to an upstream, by the status code the client got.",
            labels=["upstream", "method", "code"],
        )
        duration = HistogramMetricFamily(
            f"{PREFIX}_upstream_duration_seconds",
            "Time from sending a request upstream to receiving its response headers.",
            labels=["upstream"],
        )
        replays = CounterMetricFamily(
            f"{PREFIX}_replays",
            "Requests sent again with a fresh token after the upstream rejected the token.",
            labels=["upstream"],
        )
        retries = CounterMetricFamily(
            f"{PREFIX}_upstream_retries",
            "Idempotent requests sent again on a new connection after their upstream "
            "connection failed before any byte of the response (a stale keep-alive connection).",
            labels=["upstream"],
        )
        egress = CounterMetricFamily(
            f"{PREFIX}_egress_errors",
            "Forwarded requests and WebSocket handshakes answered 502 because the egress "
            "(outbound HTTP) proxy, not the upstream, failed: unreachable or refusing.",
            labels=["upstream"],
        )
        for route in self._routes():
            for (method, code), n in list(route.stats.requests.items()):
                requests.add_metric([route.name, method, str(code)], n)
            h = route.stats.duration
            duration.add_metric([route.name], h.buckets(), h.sum)
            replays.add_metric([route.name], route.stats.replays)
            retries.add_metric([route.name], route.stats.stale_retries)
            egress.add_metric([route.name], route.stats.egress_errors)
        yield requests
        yield duration
        yield replays
        yield retries
        yield egress
        fwd = self._forwarder()
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_requests_in_flight", "Requests being handled by the proxy listener now."
        )
        in_flight.add_metric([], fwd.in_flight if fwd else 0)
        yield in_flight
        errors = CounterMetricFamily(
            f"{PREFIX}_errors",
            "Errors the proxy answered with itself, by error code.",
            labels=["code"],
        )
        if fwd is not None:
            for error_code, count in list(fwd.errors.items()):
                errors.add_metric([error_code], count)
        yield errors

    def _tokens(self) -> Iterator[Metric]:
        cache = CounterMetricFamily(
            f"{PREFIX}_token_cache_requests",
            "Token look-ups by requests: hit (a valid cached token) or miss.",
            labels=["upstream", "result"],
        )
        waits = CounterMetricFamily(
            f"{PREFIX}_token_waits",
            "Requests that had to wait for a token to be fetched.",
            labels=["upstream"],
        )
        expiry = GaugeMetricFamily(
            f"{PREFIX}_token_expiry_timestamp_seconds",
            "When the cached access token expires (Unix time, this machine's clock).",
            labels=["upstream", "workspace"],
        )
        valid = GaugeMetricFamily(
            f"{PREFIX}_token_valid",
            "1 when a valid access token is cached for the workspace.",
            labels=["upstream", "workspace"],
        )
        failures = GaugeMetricFamily(
            f"{PREFIX}_token_consecutive_failures",
            "Consecutive failed renewals of the workspace's token (0 when healthy).",
            labels=["upstream", "workspace"],
        )
        credential = GaugeMetricFamily(
            f"{PREFIX}_credential_expiry_timestamp_seconds",
            "When the long-lived credential behind the access tokens (Royalti's refresh token, "
            "an OAuth2 refresh token) expires (Unix time); absent when it does not expire.",
            labels=["upstream", "kind"],
        )
        for name, manager in self._managers().items():
            cache.add_metric([name, "hit"], manager.hits)
            cache.add_metric([name, "miss"], manager.misses)
            waits.add_metric([name], manager.waits)
            # Unknown workspaces are a client's typo: no series for them (their ids are the
            # client's choice, and token_valid 0 would page someone for it).
            known = [s for s in manager.states() if s.state != "unknown_workspace"]
            for label, states in self._bounded(known):
                # A static credential is valid with no expiry: no expiry series for it.
                live = [s.wall_expires_at for s in states if s.valid and s.wall_expires_at]
                if live:
                    expiry.add_metric([name, label], min(live))
                valid.add_metric([name, label], 1.0 if any(s.valid for s in states) else 0.0)
                failures.add_metric([name, label], max(s.consecutive_failures for s in states))
            status = manager.source.credential_status()
            if status is not None and status.wall_expires_at is not None:
                credential.add_metric([name, status.kind], status.wall_expires_at)
        yield from (cache, waits, expiry, valid, failures, credential)

    def _bounded(self, states: list[TokenState]) -> Iterator[tuple[str, list[TokenState]]]:
        """Pinned workspaces and the most recently used ones by name, the rest as ``other``."""
        ordered = sorted(states, key=lambda s: (not s.pinned, s.idle_for))
        named, rest = ordered[: self._max_workspaces], ordered[self._max_workspaces :]
        for s in named:
            yield s.key, [s]
        if rest:
            yield "other", rest


class TokenStoreCollector(Collector):
    """The shared token store's health, and what each upstream's fetches did with it; nothing
    when the store is ``memory``."""

    def __init__(
        self,
        *,
        store: Callable[[], SharedStore | None],
        managers: Callable[[], dict[str, TokenManager]],
    ) -> None:
        self._store = store
        self._managers = managers

    def collect(self) -> Iterator[Metric]:
        store = self._store()
        if store is None:
            return
        degraded = GaugeMetricFamily(
            f"{PREFIX}_token_store_degraded",
            "1 while the shared token store does not answer and tokens are renewed locally.",
        )
        degraded.add_metric([], 1.0 if store.degraded else 0.0)
        errors = CounterMetricFamily(
            f"{PREFIX}_token_store_errors",
            "Calls to the shared token store that failed (timeout, connection, error) and "
            "stored values that did not decrypt (unreadable).",
            labels=["reason"],
        )
        for reason in ("timeout", "connection", "error", "unreadable"):
            errors.add_metric([reason], store.errors[reason])
        fetches = CounterMetricFamily(
            f"{PREFIX}_token_store_fetches",
            "Token fetches through the shared store, by outcome: shared or waited (adopted "
            "another replica's token), renewed (called the token endpoint and stored the "
            "result), fenced (lease lost: not stored), unshared (store did not answer the "
            "write), local (store down: renewed locally).",
            labels=["upstream", "outcome"],
        )
        for name, manager in self._managers().items():
            source = manager.source
            if isinstance(source, SharedSource):
                for outcome in OUTCOMES:
                    fetches.add_metric([name, outcome], source.outcomes[outcome])
        yield from (degraded, errors, fetches)
