"""``make bench``: the proxy's performance goals, measured against two references in one run.

    .venv/bin/python bench/run.py [--quick] [--only STEP,...] [--rounds N] [--no-pin]
                                  [--compare-src DIR]

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

The goals live in ``goals_speed.py`` (throughput, latency, CPU, references, profile),
``goals_footprint.py`` (idle RSS, start to ready, idle wake-ups, image) and ``goals_tokens.py``
(cold start, steady state, transfers); the processes and the load in ``runners.py``, the table in
``report.py``. This file only orders the steps.

Writes ``bench-results/results.json`` (everything measured), ``bench-results/results.md`` (the
table) and ``bench-results/profile.collapsed`` (py-spy's stacks), prints the table, and exits 0
whether or not the goals are met: the table says PASS or FAIL.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import goals_footprint as footprint
import goals_speed as speed
import goals_tokens as tokens
from harness import PY, ROOT, BenchError, loadavg, machine
from report import Row, write_results
from runners import FULL, QUICK, Bench, compile_bytecode

#: The steps ``--only`` names, in the order a full run takes them.
STEPS = (
    "throughput",
    "loops",
    "profile",
    "start",
    "redis",
    "idle",
    "cold",
    "transfers",
    "steady",
    "image",
)


class Suite(Bench):
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

    def run(self, steps: frozenset[str]) -> None:
        if steps & {"throughput", "loops", "profile"}:
            upstream = self.start_upstream()
            with self.procs.running(upstream):
                if "throughput" in steps:
                    self.guarded(
                        "throughput and latency", lambda: speed.throughput_and_latency(self)
                    )
                if "loops" in steps:
                    self.guarded("event loops", lambda: speed.event_loops(self))
                if "profile" in steps:
                    self.guarded("profile", lambda: speed.profile(self))
        if steps & {"start", "redis", "idle", "cold", "transfers"}:
            fake, fake_url, control = self.start_fake(3600)
            with self.procs.running(fake):
                # The idle proxy is left alone while the next steps run (each on its own proxy),
                # so that its minute without traffic costs the run no time of its own.
                watch = None
                if "idle" in steps:
                    try:
                        watch = footprint.start_idle_watch(self, fake_url)
                    except BenchError as exc:
                        self.rows.append(Row("idle wake-ups, no traffic", "-", str(exc), "ERROR"))
                if "start" in steps:
                    self.guarded("start and idle", lambda: footprint.start_and_idle(self, fake_url))
                if "redis" in steps:
                    self.guarded("redis store", lambda: footprint.redis_idle(self, fake_url))
                if "cold" in steps:
                    self.guarded("cold start", lambda: tokens.cold_start(self, fake_url, control))
                if "transfers" in steps:
                    self.guarded("transfers", lambda: tokens.transfers(self, fake_url, control))
                if watch is not None:
                    w = watch
                    self.guarded("idle wake-ups", lambda: footprint.finish_idle_watch(self, w))
        if "steady" in steps:
            self.guarded("steady state", lambda: tokens.steady_state(self))
        if "image" in steps:
            self.guarded("container image", lambda: footprint.image(self))


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
    p.add_argument(
        "--only",
        help=f"comma-separated steps to run, of: {', '.join(STEPS)} (default: all)",
    )
    for skip in ("loops", "profile", "transfers", "royalti-round", "image"):
        p.add_argument(f"--no-{skip}", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    steps = set(STEPS)
    if args.only_throughput:
        steps = {"throughput"}
    if args.only:
        steps = {s.strip() for s in args.only.split(",") if s.strip()}
        if unknown := steps - set(STEPS):
            p.error(f"unknown step(s) {', '.join(sorted(unknown))}; steps are {', '.join(STEPS)}")
    for skip, step in (("loops", "loops"), ("profile", "profile"), ("transfers", "transfers")):
        if getattr(args, f"no_{skip}"):
            steps.discard(step)
    if args.no_image:
        steps.discard("image")
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
    compile_bytecode(suite.proxy_src)
    if args.compare_src:
        compile_bytecode(Path(args.compare_src).resolve())
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
        suite.run(frozenset(steps))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every process", flush=True)
    finally:
        suite.procs.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    write_results(
        args.out,
        suite.rows,
        {
            "machine": info,
            "plan": dataclasses.asdict(plan),
            "steps": sorted(steps),
            "pinned": bool(suite.procs.pin),
            "upstream": args.upstream,
            "proxy_src": str(suite.proxy_src),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "seconds": round(time.perf_counter() - started, 1),
            "interrupted": interrupted,
            "goals": [r.as_dict() for r in suite.rows],
            **suite.results,
        },
    )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
