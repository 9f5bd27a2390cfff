"""What every benchmark step needs: processes that are always killed, free ports, readiness
polls, memory readings from /proc, configuration files for the proxy and nginx, and wrk.

Every child runs in a session of its own (so a Ctrl-C reaches only ``run.py``, whose ``finally``
then stops them all, by process group id), optionally pinned to one CPU with ``taskset``. Every
wait is bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable


class BenchError(RuntimeError):
    """A step could not run (a process did not start, a tool is missing)."""


# -- processes ----------------------------------------------------------------------------------


class Procs:
    """Children of the benchmark, each in its own process group, killed in :meth:`stop_all`."""

    def __init__(self, workdir: Path, *, pin: bool) -> None:
        self.workdir = workdir
        self.pin = pin and len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset")
        self.live: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpu: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` (its output goes to ``<workdir>/<name>.log``)."""
        if cpu is not None and self.pin:
            argv = ["taskset", "-c", str(cpu), *argv]  # taskset execs: the pid stays the child's
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the child
        try:
            proc = subprocess.Popen(  # noqa: S603 - the suite's own commands
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        finally:
            log.close()
        self.live[proc.pid] = (name, proc)
        return proc

    def run(
        self,
        name: str,
        argv: Sequence[str],
        *,
        timeout: float,
        cpu: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Run ``argv`` to completion (at most ``timeout`` s) and return its standard output."""
        if cpu is not None and self.pin:
            argv = ["taskset", "-c", str(cpu), *argv]
        proc = subprocess.Popen(  # noqa: S603 - the suite's own commands
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.live[proc.pid] = (name, proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise BenchError(f"{name} did not finish within {timeout:.0f} s") from None
        finally:
            if proc.poll() is None:
                self.stop(proc)
            self.live.pop(proc.pid, None)
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            raise BenchError(f"{name} exited {proc.returncode}: {' | '.join(tail)}")
        return out.decode()

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds."""
        self.live.pop(proc.pid, None)
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def stop_all(self) -> None:
        for _, proc in list(self.live.values()):
            self.stop(proc, grace=3.0)

    @contextlib.contextmanager
    def running(self, *procs: subprocess.Popen[bytes]) -> Iterator[None]:
        try:
            yield
        finally:
            for p in procs:
                self.stop(p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http(
    url: str,
    proc: subprocess.Popen[bytes] | None = None,
    *,
    timeout: float = 15.0,
    any_status: bool = False,
) -> float:
    """Poll ``url`` every 5 ms until it answers 200 (any status with ``any_status``); the
    seconds it took."""
    start = time.perf_counter()
    deadline = start + timeout
    while time.perf_counter() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{url}: the process exited with {proc.returncode} before ready")
        try:
            if http_get(url, timeout=1.0)[0] == 200 or any_status:
                return time.perf_counter() - start
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.005)
    raise BenchError(f"{url} did not answer within {timeout:.0f} s")


def wakeups(pid: int) -> int:
    """How many times process ``pid`` has gone to sleep and been woken since it started: the
    sum of ``voluntary_ctxt_switches`` over its threads (uvloop's thread pool included)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), in KiB, and voluntary_ctxt_switches (how many times the
    process went to sleep waiting for something), from /proc/<pid>/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "voluntary_ctxt_switches"):
            out[key] = int(value.split()[0])
    return out


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) used so far by every process in process group ``pgid``: the
    forwarder's cost per request, whatever share of the CPU its neighbours left it."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5, pgrp
                ticks += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``, in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total


# -- configuration files ------------------------------------------------------------------------


def proxy_config(
    path: Path,
    *,
    listen: int,
    admin: int,
    upstream: str,
    auth: Mapping[str, object],
    extra: Mapping[str, object] | None = None,
) -> Path:
    """A proxy configuration with one upstream at ``/`` (JSON is YAML); ``extra`` adds
    top-level keys (``token_store``)."""
    data: dict[str, object] = {
        "listen": f"127.0.0.1:{listen}",
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "log_level": "warning",
        "upstreams": [
            {
                "name": "bench",
                "url": upstream,
                "path_prefix": "/",
                "max_connections": 100,
                "auth": dict(auth),
            }
        ],
        **(extra or {}),
    }
    path.write_text(json.dumps(data, indent=2))
    return path


def _nginx_common(d: Path) -> str:
    return f"""
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
"""


def _nginx_http_common(d: Path) -> str:
    return f"""
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
"""


def _nginx_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def nginx_upstream_conf(d: Path, port: int, body: str, routes: Mapping[str, str]) -> Path:
    """nginx answering every path with ``body`` (200, JSON) and exact paths in ``routes`` with
    their own canned JSON: the fastest upstream there is."""
    locations = "\n".join(
        f"    location = {p} {{ return 200 {_nginx_str(b)}; }}" for p, b in routes.items()
    )
    conf = f"""worker_processes 1;
{_nginx_common(d)}
http {{
{_nginx_http_common(d)}
  server {{
    listen 127.0.0.1:{port} backlog=1024;
    default_type application/json;
    location / {{ return 200 {_nginx_str(body)}; }}
{locations}
  }}
}}
"""
    path = d / "nginx.conf"
    path.write_text(conf)
    return path


def nginx_forwarder_conf(d: Path, port: int, upstream_port: int, token: str) -> Path:
    """nginx ``proxy_pass`` with a fixed Authorization header: the compiled reference."""
    conf = f"""worker_processes 2;
{_nginx_common(d)}
http {{
{_nginx_http_common(d)}
  upstream up {{
    server 127.0.0.1:{upstream_port};
    keepalive 100;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {token}";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"""
    path = d / "nginx.conf"
    path.write_text(conf)
    return path


def nginx_argv(conf: Path) -> list[str]:
    d = conf.parent
    return ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf), "-g", "daemon off;"]


# -- the machine --------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    for mod in ("aiohttp", "uvloop", "yarl", "multidict"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[mod] = version(mod)
    for tool, flag in (("wrk", "-v"), ("nginx", "-v")):
        if shutil.which(tool):
            p = subprocess.run([tool, flag], capture_output=True, text=True, timeout=10)  # noqa: S603
            text = (p.stdout + p.stderr).strip().splitlines()
            versions[tool] = text[0] if text else "?"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "mem_total_mib": _meminfo_mib(),
        "versions": versions,
    }


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def _meminfo_mib() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return None
