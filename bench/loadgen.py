"""Python load generators for what wrk cannot do, each run in a process of its own.

    python bench/loadgen.py rate URL --rate R --duration S [--header 'K: V' ...]
    python bench/loadgen.py burst URL --n N --workspaces W [--header-name NAME]

``rate`` is an **open-loop** generator: request *i* is due at ``t0 + i/R`` whatever happened to
the earlier ones, and its latency is counted from that due time, not from when it was actually
sent, so a stall in the server shows up in the tail instead of silently lowering the rate
("coordinated omission"; wrk's closed loop has it, and wrk2, which corrects it, is not packaged
by Debian). Requests go over a pool of keep-alive connections; at a few hundred per second the
generator is nowhere near its own limit. The number of requests and the wait for stragglers are
both bounded.

``interleave`` measures latency at one connection for several servers at once, without
letting them disturb each other: one keep-alive connection to each, and one request in flight in
all, sent to each server in turn (A, B, C, A, B, C, ...). Every server sees one connection and
one request at a time, exactly as under ``wrk -c1``, while the slow drifts of a shared machine
(tens of percent over seconds) fall on all of them alike, which back-to-back runs cannot give.
A blocking socket and a pre-built request keep the client's own cost small and the same for
every server; it is in every figure, including the upstream's own, so the added latency (through
a forwarder minus straight to the upstream) does not contain it.

``burst`` opens N connections and sends N requests at once, spread round-robin over W
workspaces (named in a header): the cold-start test.

Both print one JSON object: counts by status, and latency percentiles in microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time
from collections import Counter
from urllib.parse import urlsplit

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=30)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)

    def pct(p: float) -> float:
        return round(v[min(len(v) - 1, int(p / 100 * len(v)))] * 1e6, 1)

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "p999": pct(99.9), "max": pct(100)}


async def rate(url: str, rps: float, duration: float, headers: dict[str, str]) -> dict[str, object]:
    n = int(rps * duration)
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    conn = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=conn, timeout=TIMEOUT, headers=headers) as s:
        # Open the pool before the clock starts.
        await asyncio.gather(*(_get(s, url, statuses, None, 0.0) for _ in range(8)))
        statuses.clear()
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        t0 = loop.time() + 0.05
        max_lag = 0.0
        for i in range(n):
            due = t0 + i / rps
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                max_lag = max(max_lag, -delay)
            t = asyncio.ensure_future(_get(s, url, statuses, latencies, due))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=TIMEOUT.total)
        elapsed = loop.time() - t0
    return {
        "requests": n,
        "completed": len(latencies),
        "statuses": dict(statuses),
        "achieved_rps": round(len(latencies) / elapsed, 1),
        "max_send_lag_ms": round(max_lag * 1e3, 2),
        **percentiles(latencies),
    }


async def _get(
    s: aiohttp.ClientSession,
    url: str,
    statuses: Counter[str],
    latencies: list[float] | None,
    due: float,
    headers: dict[str, str] | None = None,
) -> None:
    try:
        async with s.get(url, headers=headers) as r:
            await r.read()
            statuses[str(r.status)] += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        statuses[type(exc).__name__] += 1
        return
    if latencies is not None:
        latencies.append(asyncio.get_running_loop().time() - due)


async def burst(url: str, n: int, workspaces: int, header: str) -> dict[str, object]:
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    conn = aiohttp.TCPConnector(limit=0)  # one connection per request: N at once
    async with aiohttp.ClientSession(connector=conn, timeout=TIMEOUT) as s:
        start = asyncio.get_running_loop().time()
        await asyncio.gather(
            *(
                _get(s, url, statuses, latencies, start, {header: f"ws-{i % workspaces:02d}"})
                for i in range(n)
            )
        )
    return {"requests": n, "statuses": dict(statuses), **percentiles(latencies)}


def interleave(urls: list[str], duration: float, headers: list[str]) -> dict[str, object]:
    """One request at a time, to each of ``urls`` in turn (the order reversed every 50 turns),
    for ``duration`` seconds; per URL, in order: requests, errors, p50, p90 and mean latency."""
    conns = []
    for url in urls:
        u = urlsplit(url)
        host, port = u.hostname or "127.0.0.1", u.port or 80
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = [f"GET {u.path or '/'} HTTP/1.1", f"Host: {host}:{port}", *headers]
        conns.append((sock, ("\r\n".join(head) + "\r\n\r\n").encode()))
    lat: list[list[int]] = [[] for _ in urls]
    bad = [0 for _ in urls]
    clock = time.perf_counter_ns
    # Warm-up, not counted: connections, caches, the forwarders' upstream pools.
    for _ in range(200):
        for sock, req in conns:
            _exchange(sock, req)
    end = time.monotonic() + duration
    rounds = 0
    while time.monotonic() < end:
        order = range(len(conns)) if rounds % 2 == 0 else range(len(conns) - 1, -1, -1)
        for _ in range(50):
            for i in order:
                sock, req = conns[i]
                t = clock()
                if _exchange(sock, req) != 200:
                    bad[i] += 1
                lat[i].append(clock() - t)
        rounds += 1
    for sock, _ in conns:
        sock.close()
    return {
        "requests": [len(x) for x in lat],
        "errors": bad,
        "p50_us": [round(statistics.median(x) / 1e3, 1) for x in lat],
        "p90_us": [round(statistics.quantiles(x, n=10)[-1] / 1e3, 1) for x in lat],
        "mean_us": [round(statistics.fmean(x) / 1e3, 1) for x in lat],
    }


def _exchange(sock: socket.socket, request: bytes) -> int:
    """Send ``request``, read the whole response (Content-Length framed); its status."""
    sock.sendall(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        body += chunk
    return int(head.split(b" ", 2)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("rate")
    r.add_argument("url")
    r.add_argument("--rate", type=float, required=True)
    r.add_argument("--duration", type=float, required=True)
    r.add_argument("--header", action="append", default=[])
    b = sub.add_parser("burst")
    b.add_argument("url")
    b.add_argument("--n", type=int, default=1000)
    b.add_argument("--workspaces", type=int, default=10)
    b.add_argument("--header-name", default="X-Royalti-Workspace")
    i = sub.add_parser("interleave")
    i.add_argument("urls", nargs="+")
    i.add_argument("--duration", type=float, required=True)
    i.add_argument("--header", action="append", default=[])
    a = p.parse_args()
    if a.mode == "rate":
        headers = dict(h.split(": ", 1) for h in a.header)
        result = asyncio.run(rate(a.url, a.rate, a.duration, headers))
    elif a.mode == "interleave":
        result = interleave(a.urls, a.duration, a.header)
    else:
        result = asyncio.run(burst(a.url, a.n, a.workspaces, a.header_name))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
