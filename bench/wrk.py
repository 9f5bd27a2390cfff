"""wrk, one thread: requests/s and latency percentiles, alone or two runs at once (head to
head), with the CPU time the measured forwarder used per request."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence

from harness import BENCH, BenchError, Procs, group_cpu_seconds, proc_status

WRK_LUA = BENCH / "wrk_report.lua"


def _wrk_argv(url: str, connections: int, duration: float, headers: Sequence[str]) -> list[str]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s"]
    argv += ["-s", str(WRK_LUA)]
    for h in headers:
        argv += ["-H", h]
    return [*argv, url]


def _wrk_result(out: str, cpu_used: float | None) -> dict[str, float]:
    line = next((x for x in reversed(out.splitlines()) if x.startswith("{")), None)
    if line is None:
        raise BenchError(f"wrk printed no report: {out[-300:]!r}")
    r = json.loads(line)
    seconds = r["duration_us"] / 1e6
    errors = r["connect"] + r["read"] + r["write"] + r["timeout"] + r["non2xx"]
    result = {
        "rps": round(r["requests"] / seconds, 1),
        "requests": r["requests"],
        "errors": errors,
        "p50_us": r["p50"],
        "p90_us": r["p90"],
        "p99_us": r["p99"],
        "mean_us": round(r["mean"], 1),
    }
    if cpu_used is not None and r["requests"]:
        result["cpu_us_per_req"] = round(cpu_used / r["requests"] * 1e6, 1)
        result["cpu_share"] = round(cpu_used / seconds, 2)
    return result


def wrk(
    procs: Procs,
    url: str,
    *,
    connections: int,
    duration: float,
    headers: Sequence[str] = (),
    cpu: int | None = 0,
    measure: int | None = None,
) -> dict[str, float]:
    """One wrk run (one thread): requests/s and latency percentiles in microseconds; with
    ``measure`` (a process group id), also that group's CPU time per request."""
    cpu0 = group_cpu_seconds(measure) if measure else 0.0
    sleeps0 = proc_status(measure)["voluntary_ctxt_switches"] if measure else 0
    out = procs.run(
        "wrk", _wrk_argv(url, connections, duration, headers), timeout=duration + 30, cpu=cpu
    )
    result = _wrk_result(out, group_cpu_seconds(measure) - cpu0 if measure else None)
    if measure and result["requests"]:
        # The process that leads the group (the forwarder itself; nginx's master only).
        sleeps = proc_status(measure)["voluntary_ctxt_switches"] - sleeps0
        result["sleeps_per_req"] = round(sleeps / result["requests"], 2)
    return result


def wrk_head_to_head(
    procs: Procs,
    a: tuple[str, int],
    b: tuple[str, int],
    *,
    connections: int,
    duration: float,
    headers: Sequence[str] = (),
    cpu: int | None = 0,
    b_first: bool = False,
) -> tuple[dict[str, float], dict[str, float]]:
    """Two wrk runs at once, one against ``a`` and one against ``b`` (``(url, pgid)`` each).

    With both forwarders pinned to the same CPU, the scheduler gives each half of it, whatever
    the rest of the machine is doing: the ratio of their throughputs is the ratio of their
    costs per request, free of the noise that makes back-to-back runs on a shared machine
    differ by tens of percent.
    """
    order = [("a", a), ("b", b)]
    if b_first:
        order.reverse()
    cpu0 = {name: group_cpu_seconds(t[1]) for name, t in order}
    running: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, (url, _) in order:
            argv = _wrk_argv(url, connections, duration, headers)
            if cpu is not None and procs.pin:
                argv = ["taskset", "-c", str(cpu), *argv]
            running[name] = subprocess.Popen(  # noqa: S603 - wrk with our arguments
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            procs.live[running[name].pid] = (f"wrk-{name}", running[name])
        outs = {
            name: p.communicate(timeout=duration + 30)[0].decode() for name, p in running.items()
        }
    except subprocess.TimeoutExpired:
        raise BenchError("head-to-head wrk runs did not finish in time") from None
    finally:
        for p in running.values():
            procs.stop(p)
    used = {name: group_cpu_seconds(t[1]) - cpu0[name] for name, t in order}
    return _wrk_result(outs["a"], used["a"]), _wrk_result(outs["b"], used["b"])
