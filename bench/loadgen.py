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

``burst`` opens N connections and sends N requests at once, spread round-robin over W
workspaces (named in a header): the cold-start test.

Both print one JSON object: counts by status, and latency percentiles in microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter

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
    a = p.parse_args()
    if a.mode == "rate":
        headers = dict(h.split(": ", 1) for h in a.header)
        result = asyncio.run(rate(a.url, a.rate, a.duration, headers))
    else:
        result = asyncio.run(burst(a.url, a.n, a.workspaces, a.header_name))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
