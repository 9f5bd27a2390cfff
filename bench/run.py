"""``make bench``: the proxy's performance goals, measured against two references in one run.

    .venv/bin/python bench/run.py [--quick] [--rounds N] [--no-pin] [--compare-src DIR]

Every component is a process of its own, all on 127.0.0.1:

* **upstream**: nginx answering ``return 200`` with a small JSON body (and canned Royalti token
  endpoints for the ``type: royalti`` round), or ``bench/upstream.py`` with ``--upstream aiohttp``;
* **proxy**: ``python -m proxy run --config ...``, a ``type: static`` upstream (token
  ``bench-token``) for throughput and latency, ``type: royalti`` for the token goals;
* **bare**: ``bench/bare_forwarder.py``, the least an aiohttp forwarder can do;
* **nginx**: ``proxy_pass`` with a fixed ``Authorization`` header, 2 workers;
* **load**: wrk (closed loop: throughput, latency at one connection), ``bench/loadgen.py``
  (open loop at a fixed rate, and the 1,000-request cold-start burst), ``bench/transfer.py``
  (1 GiB up and down), against ``bench/fake_upstream.py`` (the fake Royalti API) where tokens
  matter.

On a machine with two or more CPUs the forwarder under test is pinned to CPU 1 and everything
else (load, upstream, profiler) to CPU 0, so the forwarders are compared on one core each.
Throughput and latency are measured in several rounds, and the table quotes medians of ratios
taken pair by pair within a round. On a shared machine, runs one after the other differ by tens
of percent whatever is measured, so the throughput verdict comes from a head-to-head run in
each round: the proxy and the bare forwarder loaded at once, pinned to the same CPU, so that each
gets half of it whatever the neighbours do and the ratio of their throughputs is the ratio of
their costs (an A/A check of that method agrees within 2 %). Latency at one connection cannot be
taken that way (two forwarders on one CPU queue behind each other), so its verdict comes from an
interleaved run in each round: one request at a time, to the upstream, the bare forwarder and the
proxy in turn, so every forwarder sees one connection and one request at a time while the
machine's drifts fall on all of them alike (an A/A check agrees within 1 %). wrk at one
connection, back to back twice per round in alternating order, is reported beside it. The
steady-state p99 runs both forwarders at once, so a stall of the machine lands in both tails.
docs/performance.md has the reasons and the figures.

Writes ``bench-results/results.json`` (everything measured), ``bench-results/results.md`` (the
table) and ``bench-results/profile.collapsed`` (py-spy's stacks), prints the table, and exits 0
whether or not the goals are met: the table says PASS or FAIL.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    BENCH,
    PY,
    ROOT,
    BenchError,
    Procs,
    free_port,
    http_get,
    loadavg,
    machine,
    metric,
    nginx_argv,
    nginx_forwarder_conf,
    nginx_upstream_conf,
    proc_status,
    proxy_config,
    wait_http,
    wrk,
    wrk_head_to_head,
)
from report import Row, markdown, median, spread, summarise_profile, table, verdict

FORWARDER_CPU = 1
LOAD_CPU = 0
MiB = 2**20
STATIC_TOKEN = "bench-token"
WORKSPACES = [f"ws-{i:02d}" for i in range(10)]
FAKE_AUTH = {"type": "royalti", "email": "ops@example.com", "password": "correct-horse"}
HEADERS = ("Accept: application/json", "User-Agent: royalti-bench")
BODY = json.dumps(
    {
        "success": True,
        "page": 1,
        "size": 3,
        "data": [{"id": f"artist-{n}", "name": f"Bench artist {n}"} for n in (1, 2, 3)],
    }
)


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: int
    duration: float
    uvloop_rounds: int
    steady_rate: float
    token_lifetime: int
    lifetimes: int
    transfer_size: int
    profile_seconds: float
    start_spawns: int
    burst: int


FULL = Plan(5, 3.0, 2, 200.0, 6, 5, 1024 * MiB, 10.0, 5, 1000)
# Tokens of 6 s: Royalti stamps iat and exp in whole seconds, so a token may really live up to a
# second less than exp - iat says; shorter lifetimes measure that rounding, not the proxy.
QUICK = Plan(1, 2.0, 1, 200.0, 6, 5, 256 * MiB, 5.0, 2, 1000)


class Suite:
    def __init__(self, args: argparse.Namespace, plan: Plan, work: Path) -> None:
        self.args = args
        self.plan = plan
        self.work = work
        self.procs = Procs(work, pin=not args.no_pin)
        self.proxy_src = Path(args.proxy_src).resolve()
        self.rows: list[Row] = []
        self.results: dict[str, Any] = {}
        self.upstream_url = ""
        self.upstream_port = 0
        self.upstream_proc: subprocess.Popen[bytes] | None = None

    # -- processes ------------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        d = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work))
        d.chmod(0o755)  # nginx workers drop root
        return d

    def start_upstream(self) -> subprocess.Popen[bytes]:
        self.upstream_port = port = free_port()
        self.upstream_url = f"http://127.0.0.1:{port}"
        if self.args.upstream == "aiohttp":
            argv = [PY, str(BENCH / "upstream.py"), str(port)]
            proc = self.procs.spawn("upstream", argv, cpu=LOAD_CPU)
        else:
            import jwt  # a dependency of the proxy, so in its venv

            now = int(time.time())
            refresh = jwt.encode(
                {"name": "refresh_token", "id": "bench", "iat": now, "exp": now + 86400},
                "k" * 32,
            )
            access = jwt.encode(
                {"name": "bench", "activeWorkspace": "ws-00", "iat": now, "exp": now + 86400},
                "k" * 32,
            )
            routes = {
                "/auth/login": json.dumps(
                    {
                        "refresh_token": refresh,
                        "workspaces": [{"workspaceId": w, "name": w} for w in WORKSPACES],
                    }
                ),
                "/auth/authtoken": json.dumps(
                    {"status": "success", "data": {"access_token": access}}
                ),
            }
            conf = nginx_upstream_conf(self._dir("nginx-upstream"), port, BODY, routes)
            proc = self.procs.spawn("nginx-upstream", nginx_argv(conf), cpu=LOAD_CPU)
        wait_http(f"{self.upstream_url}/user/", proc, timeout=10)
        self.upstream_proc = proc
        return proc

    def start_proxy(
        self,
        name: str,
        upstream: str,
        auth: Mapping[str, object],
        *,
        loop: str = "auto",
        src: Path | None = None,
    ) -> tuple[subprocess.Popen[bytes], str, str, float]:
        """A real proxy process; (process, proxy URL, admin URL, seconds from spawn to ready)."""
        port, admin = free_port(), free_port()
        cfg = proxy_config(
            self.work / f"{name}.json", listen=port, admin=admin, upstream=upstream, auth=auth
        )
        src = src or self.proxy_src
        env = {"ROYALTI_PROXY_LOOP": loop, "PYTHONPATH": str(src)}
        start = time.perf_counter()
        proc = self.procs.spawn(
            name,
            [PY, "-m", "proxy", "run", "--config", str(cfg)],
            cpu=FORWARDER_CPU,
            env=env,
            cwd=src,
        )
        wait_http(f"http://127.0.0.1:{admin}/readyz", proc, timeout=15)
        ready = time.perf_counter() - start
        return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", ready

    def start_bare(
        self, upstream: str, *, loop: str = "auto"
    ) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        proc = self.procs.spawn(
            f"bare-{loop}",
            [PY, str(BENCH / "bare_forwarder.py"), str(port), upstream],
            cpu=FORWARDER_CPU,
            env={"ROYALTI_PROXY_LOOP": loop},
        )
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/user/", proc, timeout=15, any_status=True)  # the fake answers 401
        return proc, url

    def start_nginx_forwarder(self) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        conf = nginx_forwarder_conf(self._dir("nginx-fwd"), port, self.upstream_port, STATIC_TOKEN)
        proc = self.procs.spawn("nginx-forwarder", nginx_argv(conf), cpu=FORWARDER_CPU)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/user/", proc, timeout=10)
        return proc, url

    def start_fake(self, lifetime: float) -> tuple[subprocess.Popen[bytes], str, str]:
        port, control = free_port(), free_port()
        argv = [PY, str(BENCH / "fake_upstream.py"), str(port), str(control)]
        argv += ["--access-lifetime", str(lifetime)]
        proc = self.procs.spawn(f"fake-{lifetime:g}", argv, cpu=LOAD_CPU)
        control_url = f"http://127.0.0.1:{control}"
        wait_http(f"{control_url}/counters", proc, timeout=15)
        return proc, f"http://127.0.0.1:{port}", control_url

    def wrk(
        self,
        url: str,
        connections: int,
        duration: float | None = None,
        proc: subprocess.Popen[bytes] | None = None,
    ) -> dict[str, float]:
        return wrk(
            self.procs,
            f"{url}/user/",
            connections=connections,
            duration=duration or self.plan.duration,
            headers=HEADERS,
            cpu=LOAD_CPU,
            measure=proc.pid if proc is not None else None,
        )

    def loadgen(self, *args: str, timeout: float) -> dict[str, Any]:
        out = self.procs.run(
            "loadgen", [PY, str(BENCH / "loadgen.py"), *args], timeout=timeout, cpu=LOAD_CPU
        )
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def loadgens(self, runs: dict[str, list[str]], *, timeout: float) -> dict[str, Any]:
        """Several ``bench/loadgen.py`` processes at once; their reports by name."""
        procs = {
            name: self.procs.spawn(name, [PY, str(BENCH / "loadgen.py"), *args], cpu=LOAD_CPU)
            for name, args in runs.items()
        }
        deadline = time.monotonic() + timeout
        out: dict[str, Any] = {}
        with self.procs.running(*procs.values()):
            for name, proc in procs.items():
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise BenchError(f"{name} did not finish within {timeout:.0f} s") from None
                lines = (self.work / f"{name}.log").read_text().strip().splitlines()
                if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
                    raise BenchError(f"{name} failed: {lines[-1:] or proc.returncode}")
                out[name] = json.loads(lines[-1])
        return out

    # -- steps ----------------------------------------------------------------------------------

    def throughput_and_latency(self) -> None:
        """Rounds of wrk at 32 and 1 connections against upstream, bare, proxy and nginx."""
        plan = self.plan
        up = self.upstream_url
        assert self.upstream_proc is not None
        static = {"type": "static", "token": STATIC_TOKEN}
        bare, bare_url = self.start_bare(up)
        proxy, proxy_url, _, _ = self.start_proxy("proxy-static", up, static)
        ngx, ngx_url = self.start_nginx_forwarder()
        targets = {
            "upstream": (up, self.upstream_proc),
            "bare": (bare_url, bare),
            "proxy": (proxy_url, proxy),
            "nginx": (ngx_url, ngx),
        }
        if self.args.compare_src:
            cand, cand_url, _, _ = self.start_proxy(
                "proxy-candidate", up, static, src=Path(self.args.compare_src).resolve()
            )
            targets["candidate"] = (cand_url, cand)
        rounds: list[dict[str, Any]] = []
        with self.procs.running(*(p for _, p in list(targets.values())[1:])):
            for url, proc in targets.values():  # warm up connection pools and caches
                self.wrk(url, 32, 1.0, proc)
            for r in range(plan.rounds):
                order = list(targets) if r % 2 == 0 else list(reversed(targets))
                result: dict[str, Any] = {"c32": {}, "c1": {}}
                for name in order:
                    url, proc = targets[name]
                    result["c32"][name] = self.wrk(url, 32, None, proc)
                # Latency at one connection, one after the other (at once, two forwarders on one
                # CPU would queue behind each other): twice per round, in both orders, half as
                # long (wrk takes whole seconds), so each round gives two back-to-back pairs.
                result["c1b"] = {}
                for key, names in (("c1", order), ("c1b", order[::-1])):
                    for name in names:
                        if key == "c1b" and name in ("upstream", "nginx"):
                            continue
                        url, proc = targets[name]
                        result[key][name] = self.wrk(url, 1, max(1, round(plan.duration / 2)), proc)
                result["interleave"] = self.interleave(targets, 2 * plan.duration)
                result["h2h"] = self.head_to_head(targets, r)
                rounds.append(result)
                print(
                    f"  round {r + 1}/{plan.rounds}: c32 "
                    + ", ".join(f"{n} {result['c32'][n]['rps']:.0f}/s" for n in targets)
                    + "; c1 p50 "
                    + ", ".join(f"{n} {result['c1'][n]['p50_us']:.0f}us" for n in targets)
                    + "; interleaved p50 "
                    + ", ".join(f"{n} {v:.0f}us" for n, v in result["interleave"].items())
                    + "; head to head "
                    + ", ".join(
                        f"{k} {v['ratio']:.3f}"
                        if "c1" not in k
                        else f"{k} p50 {v['a']['p50_us']:.0f}/{v['b']['p50_us']:.0f}us"
                        for k, v in result["h2h"].items()
                    ),
                    flush=True,
                )
            self.results["rounds"] = rounds
            self._throughput_rows(rounds)
            if not self.args.no_royalti_round:
                self.royalti_round(proxy_url, proxy)

    def interleave(
        self, targets: dict[str, tuple[str, subprocess.Popen[bytes]]], duration: float
    ) -> dict[str, float]:
        """Latency at one connection, taken without the drift of back-to-back runs: one
        request at a time, to the upstream and each forwarder in turn (bench/loadgen.py
        interleave). Each forwarder's p50 in microseconds, by name."""
        names = [n for n in targets if n != "nginx"]
        out = self.loadgen(
            "interleave",
            *(f"{targets[n][0]}/user/" for n in names),
            "--duration",
            f"{duration:g}",
            *(arg for h in HEADERS for arg in ("--header", h)),
            timeout=duration + 60,
        )
        if any(out["errors"]):
            raise BenchError(f"interleaved latency run had errors: {out['errors']}")
        return dict(zip(names, out["p50_us"], strict=True))

    def head_to_head(
        self, targets: dict[str, tuple[str, subprocess.Popen[bytes]]], r: int
    ) -> dict[str, dict[str, Any]]:
        """The proxy (and the candidate) against the bare forwarder, at the same time, at 32
        connections: both pinned to one CPU, each gets half of it, whatever the neighbours do,
        so the ratio of their throughputs is the ratio of their costs."""
        return {
            f"{name}/bare": self.h2h(targets[name], targets["bare"], r)
            for name in ("proxy", "candidate")
            if name in targets
        }

    def _throughput_rows(self, rounds: list[dict[str, Any]]) -> None:
        def rps(name: str) -> list[float]:
            return [r["c32"][name]["rps"] for r in rounds]

        def cpu(name: str) -> list[float]:
            return [r["c32"][name].get("cpu_us_per_req", float("nan")) for r in rounds]

        def added(name: str) -> list[float]:
            """Added p50 at one connection, two back-to-back samples per round."""
            return [
                r[key][name]["p50_us"] - r["c1"]["upstream"]["p50_us"]
                for r in rounds
                for key in ("c1", "c1b")
                if name in r[key]
            ]

        def ratios(a: list[float], b: list[float]) -> list[float]:
            return [x / y if y > 0 else float("nan") for x, y in zip(a, b, strict=True)]

        def sleeps(name: str) -> list[float]:
            """Times the forwarder went to sleep per request under wrk at one connection."""
            return [
                r[key][name]["sleeps_per_req"]
                for r in rounds
                for key in ("c1", "c1b")
                if "sleeps_per_req" in r[key].get(name, {})
            ]

        def inter(name: str) -> list[float]:
            """Added p50 at one connection, interleaved: one sample per round."""
            return [r["interleave"][name] - r["interleave"]["upstream"] for r in rounds]

        errors = sum(r[c][n]["errors"] for r in rounds for c in ("c32", "c1", "c1b") for n in r[c])
        tput = ratios(rps("proxy"), rps("bare"))
        h2h = [r["h2h"]["proxy/bare"]["ratio"] for r in rounds]
        self.rows.append(
            Row(
                "throughput, 32 connections",
                ">= 1.0 x bare",
                f"head to head {spread(h2h, '{:.3f}')} x bare; one after the other: proxy "
                f"{median(rps('proxy')):.0f} req/s, bare {median(rps('bare')):.0f} req/s, "
                f"ratio {spread(tput)}; CPU per request {median(cpu('proxy')):.0f} vs "
                f"{median(cpu('bare')):.0f} us; {len(rounds)} rounds"
                + (f"; {errors} errors" if errors else ""),
                verdict(median(h2h) >= 1.0 and not errors),
            )
        )

        lat = ratios(added("proxy"), added("bare"))
        ilat = ratios(inter("proxy"), inter("bare"))
        up_p50 = median(r["c1"]["upstream"]["p50_us"] for r in rounds)
        up_inter = median(r["interleave"]["upstream"] for r in rounds)
        self.rows.append(
            Row(
                "added latency p50, 1 connection",
                "<= 1.0 x bare",
                f"interleaved: proxy +{median(inter('proxy')):.0f} us, bare "
                f"+{median(inter('bare')):.0f} us, ratio {spread(ilat, '{:.3f}')} over "
                f"{len(ilat)} rounds (upstream alone {up_inter:.0f} us); wrk one after the "
                f"other: proxy +{median(added('proxy')):.0f} us, bare "
                f"+{median(added('bare')):.0f} us, ratio {spread(lat)} over {len(lat)} pairs "
                f"(upstream alone {up_p50:.0f} us), the forwarder went to sleep "
                f"{median(sleeps('proxy')):.2f} (proxy) vs {median(sleeps('bare')):.2f} (bare) "
                "times per request",
                verdict(median(ilat) <= 1.0),
            )
        )
        self.rows.append(
            Row(
                "reference: nginx proxy_pass",
                "-",
                f"{median(rps('nginx')):.0f} req/s at 32 conns "
                f"({median(ratios(rps('nginx'), rps('bare'))):.1f} x bare, "
                f"{median(cpu('nginx')):.0f} us CPU per request); "
                f"+{median(added('nginx')):.0f} us p50 at 1 conn; "
                f"upstream alone {median(rps('upstream')):.0f} req/s",
                "INFO",
            )
        )
        if "candidate" in rounds[0]["c32"]:
            cand_h2h = [r["h2h"]["candidate/bare"]["ratio"] for r in rounds]
            self.rows.append(
                Row(
                    "candidate (--compare-src) vs proxy",
                    "-",
                    f"head to head: candidate {spread(cand_h2h, '{:.3f}')} x bare, proxy "
                    f"{median(h2h):.3f} x bare; added p50 interleaved: candidate "
                    f"{spread(ratios(inter('candidate'), inter('bare')), '{:.3f}')} x bare, "
                    f"proxy {median(ilat):.3f} x bare; wrk: candidate "
                    f"{median(ratios(added('candidate'), added('bare'))):.3f} x bare, proxy "
                    f"{median(lat):.3f} x bare; one after the other "
                    f"{spread(ratios(rps('candidate'), rps('proxy')))} x proxy; "
                    f"CPU per request {median(cpu('candidate')):.1f} vs "
                    f"{median(cpu('proxy')):.1f} us "
                    f"({spread(ratios(cpu('candidate'), cpu('proxy')), '{:.3f}')} x); "
                    f"added p50 +{median(added('candidate')):.0f} vs "
                    f"+{median(added('proxy')):.0f} us",
                    "INFO",
                )
            )

    def h2h(
        self,
        a: tuple[str, subprocess.Popen[bytes]],
        b: tuple[str, subprocess.Popen[bytes]],
        r: int,
        connections: int = 32,
    ) -> dict[str, Any]:
        """``a`` and ``b`` loaded at once; ``ratio`` is a's throughput over b's (the start
        order alternates with the round ``r``)."""
        ra, rb = wrk_head_to_head(
            self.procs,
            (f"{a[0]}/user/", a[1].pid),
            (f"{b[0]}/user/", b[1].pid),
            connections=connections,
            duration=self.plan.duration,
            headers=HEADERS,
            cpu=LOAD_CPU,
            b_first=r % 2 == 1,
        )
        ratio = ra["requests"] / rb["requests"] if rb["requests"] else float("nan")
        return {"ratio": ratio, "a": ra, "b": rb}

    def royalti_round(self, static_url: str, static: subprocess.Popen[bytes]) -> None:
        """The same upstream behind a ``type: royalti`` proxy: the token path costs the same."""
        auth = {**FAKE_AUTH, "default_workspace": "ws-00"}
        proxy, url, _, _ = self.start_proxy("proxy-royalti", self.upstream_url, auth)
        with self.procs.running(proxy):
            self.wrk(url, 32, 1.0)
            res = {
                "h2h": self.h2h((url, proxy), (static_url, static), 0),
                "royalti_c1": self.wrk(url, 1),
                "static_c1": self.wrk(static_url, 1),
            }
        self.results["royalti_round"] = res
        self.rows.append(
            Row(
                "reference: type royalti vs static",
                "~1.0",
                f"head to head {res['h2h']['ratio']:.3f} x static's throughput; p50 at 1 conn "
                f"{res['royalti_c1']['p50_us']:.0f} vs {res['static_c1']['p50_us']:.0f} us",
                "INFO",
            )
        )

    def event_loops(self) -> None:
        """The proxy and the bare forwarder on uvloop against themselves on asyncio's loop."""
        up = self.upstream_url
        static = {"type": "static", "token": STATIC_TOKEN}
        fwd: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
        for loop in ("uvloop", "asyncio"):
            p, url, _, _ = self.start_proxy(f"proxy-{loop}", up, static, loop=loop)
            fwd[f"proxy-{loop}"] = (url, p)
            bp, burl = self.start_bare(up, loop=loop)
            fwd[f"bare-{loop}"] = (burl, bp)
        runs: list[dict[str, Any]] = []
        with self.procs.running(*(p for _, p in fwd.values())):
            for url, proc in fwd.values():
                self.wrk(url, 32, 1.0, proc)
            for r in range(self.plan.uvloop_rounds):
                res: dict[str, Any] = {
                    "proxy": self.h2h(fwd["proxy-uvloop"], fwd["proxy-asyncio"], r),
                    "bare": self.h2h(fwd["bare-uvloop"], fwd["bare-asyncio"], r),
                }
                for name, (url, _) in fwd.items():
                    res[f"{name}_c1_p50_us"] = self.wrk(url, 1)["p50_us"]
                runs.append(res)
        self.results["event_loops"] = runs

        def m(key: str) -> float:
            return median(r[key] for r in runs)

        self.rows.append(
            Row(
                "reference: uvloop vs asyncio loop",
                "-",
                f"head to head, uvloop's throughput: proxy "
                f"{spread([r['proxy']['ratio'] for r in runs])} x asyncio's, bare "
                f"{median(r['bare']['ratio'] for r in runs):.2f} x; p50 at 1 conn: proxy "
                f"{m('proxy-uvloop_c1_p50_us'):.0f} vs {m('proxy-asyncio_c1_p50_us'):.0f} us, "
                f"bare {m('bare-uvloop_c1_p50_us'):.0f} vs {m('bare-asyncio_c1_p50_us'):.0f} us",
                "INFO",
            )
        )

    def profile(self) -> None:
        """py-spy on the proxy while wrk drives it at 32 connections."""
        pyspy = Path(PY).parent / "py-spy"
        if not pyspy.exists():
            self.results["profile"] = {"error": "py-spy not installed"}
            return
        seconds = self.plan.profile_seconds
        proxy, url, _, _ = self.start_proxy(
            "proxy-profiled", self.upstream_url, {"type": "static", "token": STATIC_TOKEN}
        )
        out = self.args.out / "profile.collapsed"
        with self.procs.running(proxy):
            self.wrk(url, 32, 1.0)
            load = self.procs.spawn(
                "wrk-profile",
                [
                    "wrk",
                    "-t1",
                    "-c32",
                    f"-d{seconds + 3:g}s",
                    *[arg for h in HEADERS for arg in ("-H", h)],
                    f"{url}/user/",
                ],
                cpu=LOAD_CPU,
            )
            with self.procs.running(load):
                time.sleep(1.0)
                self.procs.run(
                    "py-spy",
                    [
                        str(pyspy),
                        "record",
                        "-p",
                        str(proxy.pid),
                        "-d",
                        f"{seconds:g}",
                        "-r",
                        "200",
                        "--nonblocking",
                        "-f",
                        "raw",
                        "-o",
                        str(out),
                    ],
                    timeout=seconds + 30,
                    cpu=LOAD_CPU,
                )
        summary = summarise_profile(out)
        self.results["profile"] = summary
        print(f"  profile: {summary['samples']} busy samples -> {out}", flush=True)

    def start_and_idle(self, fake_url: str) -> None:
        ready_s: list[float] = []
        idle_kib: list[int] = []
        auth = {**FAKE_AUTH, "default_workspace": "ws-00"}
        for i in range(self.plan.start_spawns):
            proc, _, _, ready = self.start_proxy(f"proxy-start-{i}", fake_url, auth)
            with self.procs.running(proc):
                ready_s.append(ready)
                time.sleep(1.0)
                idle_kib.append(proc_status(proc.pid)["VmRSS"])
        self.results["start"] = {"ready_s": ready_s, "idle_rss_kib": idle_kib}
        idle = median(idle_kib) / 1024
        self.rows.append(
            Row(
                "idle RSS",
                "<= 60 MiB",
                f"{idle:.1f} MiB VmRSS after ready (max {max(idle_kib) / 1024:.1f}, "
                f"{len(idle_kib)} starts)",
                verdict(max(idle_kib) / 1024 <= 60),
            )
        )
        self.rows.append(
            Row(
                "start to ready",
                "<= 1 s",
                f"{median(ready_s):.2f} s spawn to /readyz 200, median of {len(ready_s)} "
                f"(max {max(ready_s):.2f} s); includes login + 1 authtoken against the fake",
                verdict(median(ready_s) <= 1.0),
            )
        )

    def cold_start(self, fake_url: str, control: str) -> None:
        before = json.loads(http_get(f"{control}/counters")[1])
        proc, url, admin, _ = self.start_proxy("proxy-cold", fake_url, dict(FAKE_AUTH))
        with self.procs.running(proc):
            burst = self.loadgen(
                "burst",
                f"{url}/user/",
                "--n",
                str(self.plan.burst),
                "--workspaces",
                "10",
                timeout=90,
            )
            text = http_get(f"{admin}/metrics")[1].decode()
        after = json.loads(http_get(f"{control}/counters")[1])
        logins = after["login_calls"] - before["login_calls"]
        per_ws = {
            w: after["authtoken_calls"].get(w, 0) - before["authtoken_calls"].get(w, 0)
            for w in WORKSPACES
        }
        authtokens = sum(per_ws.values())
        m_login = metric(text, "royalti_proxy_token_fetches_total", kind="login", outcome="success")
        m_access = metric(
            text, "royalti_proxy_token_fetches_total", kind="access", outcome="success"
        )
        ok200 = burst["statuses"].get("200", 0)
        self.results["cold_start"] = {
            "burst": burst,
            "logins": logins,
            "authtoken_per_workspace": per_ws,
            "metrics_login": m_login,
            "metrics_access": m_access,
        }
        self.rows.append(
            Row(
                f"cold start: {self.plan.burst} requests, 10 workspaces",
                "1 login, 10 authtoken",
                f"{logins} login, {authtokens} authtoken "
                f"({max(per_ws.values())} max per workspace; "
                f"metrics {m_login:.0f}/{m_access:.0f}); "
                f"{ok200}/{self.plan.burst} answered 200, "
                f"p99 {burst.get('p99', 0) / 1000:.0f} ms",
                verdict(
                    logins == 1
                    and authtokens == 10
                    and max(per_ws.values()) == 1
                    and ok200 == self.plan.burst
                ),
            )
        )

    def steady_state(self) -> None:
        plan = self.plan
        lifetime = plan.token_lifetime
        duration = lifetime * plan.lifetimes
        fake, fake_url, control = self.start_fake(lifetime)
        with self.procs.running(fake):
            auth = {**FAKE_AUTH, "default_workspace": "ws-00"}
            proxy, url, admin, _ = self.start_proxy("proxy-steady", fake_url, auth)
            token = json.loads(http_get(f"{control}/token?workspace=ws-00&lifetime=3600")[1])
            bare, bare_url = self.start_bare(fake_url)
            rate = ["--rate", f"{plan.steady_rate:g}", "--duration", f"{duration:g}"]
            with self.procs.running(proxy, bare):
                m0 = http_get(f"{admin}/metrics")[1].decode()
                c0 = json.loads(http_get(f"{control}/counters")[1])
                # Both at once, each from its own generator at the full rate: a stall of the
                # shared machine lands in both tails, not in one of them.
                runs = self.loadgens(
                    {
                        "steady-proxy": ["rate", f"{url}/user/", *rate],
                        "steady-bare": [
                            "rate",
                            f"{bare_url}/user/",
                            *rate,
                            "--header",
                            f"Authorization: Bearer {token['access_token']}",
                        ],
                    },
                    timeout=duration + 60,
                )
                m1 = http_get(f"{admin}/metrics")[1].decode()
                c1 = json.loads(http_get(f"{control}/counters")[1])
        through_proxy, through_bare = runs["steady-proxy"], runs["steady-bare"]

        def delta(name: str, **labels: str) -> float:
            return metric(m1, name, **labels) - metric(m0, name, **labels)

        waits = delta("royalti_proxy_token_waits_total")
        renewals = delta("royalti_proxy_token_fetches_total", kind="access", outcome="success")
        expired = c1["expired_seen"] - c0["expired_seen"]
        unauthorized = c1["unauthorized"] - c0["unauthorized"]
        ok = through_proxy["statuses"].get("200", 0)
        self.results["steady_state"] = {
            "lifetime_s": lifetime,
            "duration_s": duration,
            "rate": plan.steady_rate,
            "proxy": through_proxy,
            "bare": through_bare,
            "token_waits": waits,
            "renewals": renewals,
            "upstream_expired_seen": expired,
            "upstream_401": unauthorized,
        }
        self.rows.append(
            Row(
                f"steady state: {plan.lifetimes} token lifetimes ({lifetime} s) at "
                f"{plan.steady_rate:g}/s",
                "0 token waits",
                f"{waits:.0f} waits, {renewals:.0f} renewals, {expired} expired / "
                f"{unauthorized} 401 at upstream; {ok}/{through_proxy['requests']} answered 200",
                verdict(
                    waits == 0
                    and expired == 0
                    and unauthorized == 0
                    and ok == through_proxy["requests"]
                ),
            )
        )
        ratio = through_proxy["p99"] / through_bare["p99"]
        self.rows.append(
            Row(
                "steady state p99 (both at once)",
                "<= 1.5 x bare",
                f"proxy {through_proxy['p99'] / 1000:.2f} ms, "
                f"bare {through_bare['p99'] / 1000:.2f} ms ({ratio:.2f} x); "
                f"p50 {through_proxy['p50'] / 1000:.2f} vs "
                f"{through_bare['p50'] / 1000:.2f} ms",
                verdict(ratio <= 1.5),
            )
        )

    def transfers(self, fake_url: str, control: str) -> None:
        size = self.plan.transfer_size
        auth = {**FAKE_AUTH, "default_workspace": "ws-00"}
        for kind, path in (
            ("upload", "/file/royalty"),
            ("download", f"/file/1/download?size={size}"),
        ):
            proc, url, _, _ = self.start_proxy(f"proxy-{kind}", fake_url, auth)
            with self.procs.running(proc):
                idle = proc_status(proc.pid)["VmRSS"]
                out = self.procs.run(
                    "transfer",
                    [PY, str(BENCH / "transfer.py"), kind, url + path, str(size)],
                    timeout=300,
                    cpu=LOAD_CPU,
                )
                res = json.loads(out.strip().splitlines()[-1])
                status = proc_status(proc.pid)
            res.update(idle_rss_kib=idle, peak_rss_kib=status["VmHWM"])
            self.results[kind] = res
            peak = status["VmHWM"] / 1024
            self.rows.append(
                Row(
                    f"{size // MiB} MiB {kind}",
                    "peak RSS <= 100 MiB",
                    f"peak {peak:.1f} MiB VmHWM (idle {idle / 1024:.1f}); "
                    f"{res['mib_s']} MiB/s, {'complete' if res['ok'] else 'INCOMPLETE'}",
                    verdict(peak <= 100 and bool(res["ok"])),
                )
            )

    def guarded(self, name: str, step: Callable[[], None]) -> None:
        """Run one step; a step that cannot run becomes an ERROR row, not a crash."""
        print(f"[{time.strftime('%H:%M:%S')}] {name} (load {loadavg()})", flush=True)
        t = time.perf_counter()
        try:
            step()
        except BenchError as exc:
            self.rows.append(Row(name, "-", str(exc), "ERROR"))
            print(f"  ERROR: {exc}", flush=True)
        self.results.setdefault("step_seconds", {})[name] = round(time.perf_counter() - t, 1)

    def run(self) -> None:
        upstream = self.start_upstream()
        with self.procs.running(upstream):
            self.guarded("throughput and latency", self.throughput_and_latency)
            if not self.args.no_loops:
                self.guarded("event loops", self.event_loops)
            if not self.args.no_profile:
                self.guarded("profile", self.profile)
        fake, fake_url, control = self.start_fake(3600)
        with self.procs.running(fake):
            self.guarded("start and idle", lambda: self.start_and_idle(fake_url))
            self.guarded("cold start", lambda: self.cold_start(fake_url, control))
            if not self.args.no_transfers:
                self.guarded("transfers", lambda: self.transfers(fake_url, control))
        self.guarded("steady state", self.steady_state)


def ensure_tools() -> list[str]:
    """Install what the suite needs and is missing: wrk and nginx from Debian (as root only),
    py-spy and uvloop into this venv. Returns what is still missing."""
    missing = [t for t in ("wrk", "nginx") if not shutil.which(t)]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} (apt-get)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", *missing]
        # The suite's own tools, from Debian, by name (S603/S607: no input from outside).
        if subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode != 0:  # noqa: S603
            update = ["apt-get", "update", "-q"]
            subprocess.run(update, env=env, capture_output=True, timeout=300)  # noqa: S603
            subprocess.run(cmd, env=env, capture_output=True, timeout=300)  # noqa: S603
    py_missing = []
    if not (Path(PY).parent / "py-spy").exists():
        py_missing.append("py-spy")
    try:
        import uvloop  # noqa: F401
    except ImportError:
        py_missing.append("uvloop")
    if py_missing:
        print(f"installing {' '.join(py_missing)} (pip)", flush=True)
        pip = [PY, "-m", "pip", "install", "-q", *py_missing]
        subprocess.run(pip, timeout=300, check=False)  # noqa: S603
    return [t for t in ("wrk", "nginx") if not shutil.which(t)]


def main() -> int:
    p = argparse.ArgumentParser(description="Run the proxy's performance suite.")
    p.add_argument("--quick", action="store_true", help="one short round, 256 MiB transfers")
    p.add_argument("--rounds", type=int, help="throughput/latency rounds (default 5)")
    p.add_argument("--duration", type=int, help="whole seconds per wrk run (default 3)")
    p.add_argument("--upstream", choices=("nginx", "aiohttp"), default="nginx")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--proxy-src", default=str(ROOT), help="directory holding the proxy package")
    p.add_argument(
        "--compare-src",
        help="another directory holding a proxy package, benchmarked round by round next to "
        "--proxy-src (to measure a change: copy proxy/ to DIR/proxy, edit, pass DIR)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench-results")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--only-throughput", action="store_true", help="throughput/latency rounds only")
    for skip in ("loops", "profile", "transfers", "royalti-round"):
        p.add_argument(f"--no-{skip}", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    if args.duration:
        plan = dataclasses.replace(plan, duration=args.duration)
    args.out.mkdir(parents=True, exist_ok=True)
    missing = ensure_tools()
    if missing:
        print(f"bench: {', '.join(missing)} missing and cannot be installed (not root?)")
        return 0

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    work = Path(tempfile.mkdtemp(prefix="royalti-bench-"))
    work.chmod(0o755)
    suite = Suite(args, plan, work)
    started = time.perf_counter()
    interrupted = False
    info = machine()
    print(
        f"royalti-auth-proxy bench: {info['nproc']} CPUs ({info['cpu_model']}), Python "
        f"{info['python']}, {'quick' if args.quick else 'full'} run, "
        f"pinned: {bool(suite.procs.pin)}",
        flush=True,
    )
    load_before = loadavg()
    try:
        if args.only_throughput:
            up = suite.start_upstream()
            with suite.procs.running(up):
                suite.guarded("throughput and latency", suite.throughput_and_latency)
        else:
            suite.run()
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every process", flush=True)
    finally:
        suite.procs.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results = {
        "machine": info,
        "plan": dataclasses.asdict(plan),
        "pinned": bool(suite.procs.pin),
        "upstream": args.upstream,
        "proxy_src": str(suite.proxy_src),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "seconds": round(time.perf_counter() - started, 1),
        "interrupted": interrupted,
        "goals": [r.as_dict() for r in suite.rows],
        **suite.results,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(suite.rows) + "\n")
    print()
    print(table(suite.rows))
    prof = suite.results.get("profile")
    if isinstance(prof, dict) and prof.get("top_self"):
        print("\nprofile, self time (share of busy samples):")
        for name, pct in prof["top_self"][:10]:
            print(f"  {pct:5.1f} %  {name}")
    print(f"\n{results['seconds']:.0f} s; results in {args.out / 'results.json'}")
    failed = [r.goal for r in suite.rows if r.verdict in ("FAIL", "ERROR")]
    if failed:
        print(f"goals not met: {'; '.join(failed)}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
