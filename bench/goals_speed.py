"""The speed goals: throughput head to head at 32 connections, added latency at one connection
(interleaved, and wrk back to back), CPU per request, and the references (nginx, ``type:
royalti``, uvloop against asyncio's loop), plus the py-spy profile."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from harness import PY
from report import Row, median, spread, summarise_profile, verdict
from runners import FAKE_AUTH, HEADERS, LOAD_CPU, STATIC, STATIC_TOKEN, Bench, Target

#: Issue 15's targets: the proxy must do less per request than the bare aiohttp forwarder.
THROUGHPUT_RATIO = 1.15
LATENCY_RATIO = 0.95
CPU_US_PER_REQUEST = 180.0


def throughput_and_latency(b: Bench) -> None:
    """Rounds of wrk at 32 and 1 connections against upstream, bare, proxy and nginx."""
    plan = b.plan
    up = b.upstream_url
    assert b.upstream_proc is not None
    static = STATIC
    bare_url, bare = b.start_bare(up)
    proxy, proxy_url, _, _ = b.start_proxy("proxy-static", up, static)
    ngx_url, ngx = b.start_nginx_forwarder()
    targets = {
        "upstream": (up, b.upstream_proc),
        "bare": (bare_url, bare),
        "proxy": (proxy_url, proxy),
        "nginx": (ngx_url, ngx),
    }
    if b.args.compare_src:
        cand, cand_url, _, _ = b.start_proxy(
            "proxy-candidate", up, static, src=Path(b.args.compare_src).resolve()
        )
        targets["candidate"] = (cand_url, cand)
    rounds: list[dict[str, Any]] = []
    with b.procs.running(*(p for _, p in list(targets.values())[1:])):
        for url, proc in targets.values():  # warm up connection pools and caches
            b.wrk(url, 32, 1.0, proc)
        for r in range(plan.rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            result: dict[str, Any] = {"c32": {}, "c1": {}}
            for name in order:
                url, proc = targets[name]
                result["c32"][name] = b.wrk(url, 32, None, proc)
            # Latency at one connection, one after the other (at once, two forwarders on one
            # CPU would queue behind each other): twice per round, in both orders, half as
            # long (wrk takes whole seconds), so each round gives two back-to-back pairs.
            result["c1b"] = {}
            for key, names in (("c1", order), ("c1b", order[::-1])):
                for name in names:
                    if key == "c1b" and name in ("upstream", "nginx"):
                        continue
                    url, proc = targets[name]
                    result[key][name] = b.wrk(url, 1, max(1, round(plan.duration / 2)), proc)
            result["interleave"] = b.interleave(targets, 2 * plan.duration)
            result["h2h"] = head_to_head(b, targets, r)
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
        b.results["rounds"] = rounds
        throughput_rows(b, rounds)
        if not b.args.no_royalti_round:
            royalti_round(b, proxy_url, proxy)


def head_to_head(b: Bench, targets: dict[str, Target], r: int) -> dict[str, dict[str, Any]]:
    """The proxy (and the candidate) against the bare forwarder, at the same time, at 32
    connections: both pinned to one CPU, each gets half of it, whatever the neighbours do,
    so the ratio of their throughputs is the ratio of their costs."""
    return {
        f"{name}/bare": b.h2h(targets[name], targets["bare"], r)
        for name in ("proxy", "candidate")
        if name in targets
    }


def throughput_rows(b: Bench, rounds: list[dict[str, Any]]) -> None:
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
    b.rows.append(
        Row(
            "throughput, 32 connections",
            f">= {THROUGHPUT_RATIO} x bare",
            f"head to head {spread(h2h, '{:.3f}')} x bare; one after the other: proxy "
            f"{median(rps('proxy')):.0f} req/s, bare {median(rps('bare')):.0f} req/s, "
            f"ratio {spread(tput)}; CPU per request {median(cpu('proxy')):.0f} vs "
            f"{median(cpu('bare')):.0f} us; {len(rounds)} rounds"
            + (f"; {errors} errors" if errors else ""),
            verdict(median(h2h) >= THROUGHPUT_RATIO and not errors),
        )
    )
    cpu_proxy = median(cpu("proxy"))
    b.rows.append(
        Row(
            "CPU per request, 32 connections",
            f"<= {CPU_US_PER_REQUEST:.0f} us",
            f"proxy {spread(cpu('proxy'), '{:.0f}')} us, bare {median(cpu('bare')):.0f} us "
            f"(CPU time of the process over its requests, wrk alone against it; "
            f"{len(rounds)} rounds)",
            verdict(cpu_proxy <= CPU_US_PER_REQUEST),
        )
    )

    lat = ratios(added("proxy"), added("bare"))
    ilat = ratios(inter("proxy"), inter("bare"))
    up_p50 = median(r["c1"]["upstream"]["p50_us"] for r in rounds)
    up_inter = median(r["interleave"]["upstream"] for r in rounds)
    b.rows.append(
        Row(
            "added latency p50, 1 connection",
            f"<= {LATENCY_RATIO} x bare",
            f"interleaved: proxy +{median(inter('proxy')):.0f} us, bare "
            f"+{median(inter('bare')):.0f} us, ratio {spread(ilat, '{:.3f}')} over "
            f"{len(ilat)} rounds (upstream alone {up_inter:.0f} us); wrk one after the "
            f"other: proxy +{median(added('proxy')):.0f} us, bare "
            f"+{median(added('bare')):.0f} us, ratio {spread(lat)} over {len(lat)} pairs "
            f"(upstream alone {up_p50:.0f} us), the forwarder went to sleep "
            f"{median(sleeps('proxy')):.2f} (proxy) vs {median(sleeps('bare')):.2f} (bare) "
            "times per request",
            verdict(median(ilat) <= LATENCY_RATIO),
        )
    )
    b.rows.append(
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
        b.rows.append(
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


def royalti_round(b: Bench, static_url: str, static: subprocess.Popen[bytes]) -> None:
    """The same upstream behind a ``type: royalti`` proxy: the token path costs the same."""
    auth = {**FAKE_AUTH, "default_workspace": "ws-00"}
    proxy, url, _, _ = b.start_proxy("proxy-royalti", b.upstream_url, auth)
    with b.procs.running(proxy):
        b.wrk(url, 32, 1.0)
        res = {
            "h2h": b.h2h((url, proxy), (static_url, static), 0),
            "royalti_c1": b.wrk(url, 1),
            "static_c1": b.wrk(static_url, 1),
        }
    b.results["royalti_round"] = res
    b.rows.append(
        Row(
            "reference: type royalti vs static",
            "~1.0",
            f"head to head {res['h2h']['ratio']:.3f} x static's throughput; p50 at 1 conn "
            f"{res['royalti_c1']['p50_us']:.0f} vs {res['static_c1']['p50_us']:.0f} us",
            "INFO",
        )
    )


def event_loops(b: Bench) -> None:
    """The proxy and the bare forwarder on uvloop against themselves on asyncio's loop."""
    up = b.upstream_url
    static = STATIC
    fwd: dict[str, Target] = {}
    for loop in ("uvloop", "asyncio"):
        p, url, _, _ = b.start_proxy(f"proxy-{loop}", up, static, loop=loop)
        fwd[f"proxy-{loop}"] = (url, p)
        burl, bp = b.start_bare(up, loop=loop)
        fwd[f"bare-{loop}"] = (burl, bp)
    runs: list[dict[str, Any]] = []
    with b.procs.running(*(p for _, p in fwd.values())):
        for url, proc in fwd.values():
            b.wrk(url, 32, 1.0, proc)
        for r in range(b.plan.uvloop_rounds):
            res: dict[str, Any] = {
                "proxy": b.h2h(fwd["proxy-uvloop"], fwd["proxy-asyncio"], r),
                "bare": b.h2h(fwd["bare-uvloop"], fwd["bare-asyncio"], r),
            }
            for name, (url, _) in fwd.items():
                res[f"{name}_c1_p50_us"] = b.wrk(url, 1)["p50_us"]
            runs.append(res)
    b.results["event_loops"] = runs

    def m(key: str) -> float:
        return median(r[key] for r in runs)

    b.rows.append(
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


def profile(b: Bench) -> None:
    """py-spy on the proxy while wrk drives it at 32 connections."""
    pyspy = Path(PY).parent / "py-spy"
    if not pyspy.exists():
        b.results["profile"] = {"error": "py-spy not installed"}
        return
    seconds = b.plan.profile_seconds
    proxy, url, _, _ = b.start_proxy(
        "proxy-profiled", b.upstream_url, {"type": "static", "token": STATIC_TOKEN}
    )
    out = b.args.out / "profile.collapsed"
    with b.procs.running(proxy):
        b.wrk(url, 32, 1.0)
        load = b.procs.spawn(
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
        with b.procs.running(load):
            time.sleep(1.0)
            b.procs.run(
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
    b.results["profile"] = summary
    print(f"  profile: {summary['samples']} busy samples -> {out}", flush=True)
