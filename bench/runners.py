"""The processes the goals are measured with, and the load put on them.

:class:`Bench` starts every component (upstream, proxy, bare forwarder, nginx, the fake Royalti
API, redis-server) pinned where it belongs, runs wrk and ``bench/loadgen.py`` against them, and
collects the goals' rows and raw figures. The goals themselves are in ``goals_*.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    BENCH,
    PY,
    BenchError,
    Procs,
    free_port,
    nginx_argv,
    nginx_forwarder_conf,
    nginx_upstream_conf,
    proxy_config,
    wait_http,
)
from report import Row
from wrk import wrk, wrk_head_to_head

FORWARDER_CPU = 1
LOAD_CPU = 0
MiB = 2**20
STATIC_TOKEN = "bench-token"
STATIC = {"type": "static", "token": STATIC_TOKEN}
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
#: A Fernet key for the Redis store's sealing (the bench's own, never a real one).
BENCH_FERNET_KEY = "A" * 43 + "="

Target = tuple[str, subprocess.Popen[bytes]]


#: The proxy's default event loop (``event_loop``): every goal is measured on it, the bare
#: forwarder too; uvloop, opt-in, has rows of its own (``loops``, idle RSS).
DEFAULT_LOOP = "asyncio"


def compile_bytecode(src: Path) -> None:
    """Write ``src/proxy``'s bytecode, as ``pip install`` and the Docker image do, so that a
    proxy started from a source tree (with PYTHONDONTWRITEBYTECODE set, which this machine's
    environment does) does not compile its modules at every start: 0.6 MiB of idle RSS and a
    slower start that no installed proxy has."""
    subprocess.run([PY, "-m", "compileall", "-q", str(src / "proxy")], check=True)  # noqa: S603


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
    idle_seconds: float


FULL = Plan(5, 3.0, 2, 200.0, 6, 5, 1024 * MiB, 10.0, 5, 1000, 60.0)
# Tokens of 6 s: Royalti stamps iat and exp in whole seconds, so a token may really live up to a
# second less than exp - iat says; shorter lifetimes measure that rounding, not the proxy.
QUICK = Plan(1, 2.0, 1, 200.0, 6, 5, 256 * MiB, 5.0, 2, 1000, 20.0)


def _unsigned_jwt(claims: Mapping[str, object]) -> str:
    """A JWT with an empty signature: the proxy only reads its claims (nginx's canned tokens)."""
    import base64

    def seg(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{seg({'alg': 'HS256', 'typ': 'JWT'})}.{seg(dict(claims))}.c2ln"


class Bench:
    """What every goal uses: the plan, the processes, and the rows and results so far."""

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

    def _dir(self, name: str) -> Path:
        d = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work))
        d.chmod(0o755)  # nginx workers drop root
        return d

    # -- processes ------------------------------------------------------------------------------

    def start_upstream(self) -> subprocess.Popen[bytes]:
        self.upstream_port = port = free_port()
        self.upstream_url = f"http://127.0.0.1:{port}"
        if self.args.upstream == "aiohttp":
            argv = [PY, str(BENCH / "upstream.py"), str(port)]
            proc = self.procs.spawn("upstream", argv, cpu=LOAD_CPU)
        else:
            now = int(time.time())
            refresh = _unsigned_jwt(
                {"name": "refresh_token", "id": "bench", "iat": now, "exp": now + 86400}
            )
            access = _unsigned_jwt(
                {"name": "bench", "activeWorkspace": "ws-00", "iat": now, "exp": now + 86400}
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
        loop: str = DEFAULT_LOOP,
        src: Path | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> tuple[subprocess.Popen[bytes], str, str, float]:
        """A real proxy process; (process, proxy URL, admin URL, seconds from spawn to ready)."""
        port, admin = free_port(), free_port()
        cfg = proxy_config(
            self.work / f"{name}.json",
            listen=port,
            admin=admin,
            upstream=upstream,
            auth=auth,
            extra=extra,
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

    def start_bare(self, upstream: str, *, loop: str = DEFAULT_LOOP) -> Target:
        port = free_port()
        proc = self.procs.spawn(
            f"bare-{loop}",
            [PY, str(BENCH / "bare_forwarder.py"), str(port), upstream],
            cpu=FORWARDER_CPU,
            env={"ROYALTI_PROXY_LOOP": loop},
        )
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/user/", proc, timeout=15, any_status=True)  # the fake answers 401
        return url, proc

    def start_nginx_forwarder(self) -> Target:
        port = free_port()
        conf = nginx_forwarder_conf(self._dir("nginx-fwd"), port, self.upstream_port, STATIC_TOKEN)
        proc = self.procs.spawn("nginx-forwarder", nginx_argv(conf), cpu=FORWARDER_CPU)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/user/", proc, timeout=10)
        return url, proc

    def start_fake(self, lifetime: float) -> tuple[subprocess.Popen[bytes], str, str]:
        port, control = free_port(), free_port()
        argv = [PY, str(BENCH / "fake_upstream.py"), str(port), str(control)]
        argv += ["--access-lifetime", str(lifetime)]
        proc = self.procs.spawn(f"fake-{lifetime:g}", argv, cpu=LOAD_CPU)
        control_url = f"http://127.0.0.1:{control}"
        wait_http(f"{control_url}/counters", proc, timeout=15)
        return proc, f"http://127.0.0.1:{port}", control_url

    def start_redis(self) -> tuple[subprocess.Popen[bytes], str] | None:
        """A throw-away redis-server (no persistence); None when there is none installed."""
        server = shutil.which("redis-server")
        if server is None:
            return None
        port = free_port()
        argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self._dir("redis"))]
        proc = self.procs.spawn("redis", argv, cpu=LOAD_CPU)
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return proc, f"redis://127.0.0.1:{port}/0"
            except OSError:
                time.sleep(0.02)
        self.procs.stop(proc)
        raise BenchError("redis-server did not answer PING within 10 s")

    # -- load -----------------------------------------------------------------------------------

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

    def h2h(self, a: Target, b: Target, r: int, connections: int = 32) -> dict[str, Any]:
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

    def interleave(self, targets: dict[str, Target], duration: float) -> dict[str, float]:
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
