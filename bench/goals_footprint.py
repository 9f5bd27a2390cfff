"""The footprint goals: what an idle sidecar costs in every pod.

* idle RSS after ready, one workspace warm, with the in-memory store (on the default loop,
  asyncio's, and for reference on uvloop, which is opt-in) and with the Redis store;
* start to ready, login and the default workspace's token included;
* idle wake-ups: how often the process wakes with no traffic at all;
* the container image's size, when a container builder can build it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import PY, ROOT, BenchError, proc_status, wakeups
from report import Row, median, verdict
from runners import BENCH_FERNET_KEY, FAKE_AUTH, Bench

IDLE_RSS_MIB = 40.0
IDLE_RSS_REDIS_MIB = 60.0
READY_S = 0.3
WAKEUPS_PER_S = 1.0
#: Spawns on uvloop (opt-in: event_loop: uvloop), beside the default loop's, when installed.
UVLOOP_SPAWNS = 3
WARM = {**FAKE_AUTH, "default_workspace": "ws-00"}


def _idle_rss(b: Bench, name: str, fake_url: str, **kw: object) -> tuple[float, int]:
    """(seconds from spawn to ready, VmRSS in KiB 1 s after ready) of one fresh proxy."""
    proc, _, _, ready = b.start_proxy(name, fake_url, WARM, **kw)  # type: ignore[arg-type]
    with b.procs.running(proc):
        time.sleep(1.0)
        return ready, proc_status(proc.pid)["VmRSS"]


def start_and_idle(b: Bench, fake_url: str) -> None:
    """Idle RSS and start to ready on the default loop (asyncio's: ``event_loop``'s default,
    for a plain install and the Docker image alike), the goal; and idle RSS on uvloop, which
    ``event_loop: uvloop`` opts in to (with the ``fast`` extra), as a row of its own."""
    ready_s: list[float] = []
    idle_kib: list[int] = []
    for i in range(b.plan.start_spawns):
        ready, rss = _idle_rss(b, f"proxy-start-{i}", fake_url)
        ready_s.append(ready)
        idle_kib.append(rss)
    uvloop_kib = (
        [
            _idle_rss(b, f"proxy-start-uvloop-{i}", fake_url, loop="uvloop")[1]
            for i in range(UVLOOP_SPAWNS)
        ]
        if _has_uvloop()
        else []
    )
    b.results["start"] = {
        "ready_s": ready_s,
        "idle_rss_kib": idle_kib,
        "idle_rss_uvloop_kib": uvloop_kib,
    }
    worst = max(idle_kib) / 1024
    b.rows.append(
        Row(
            "idle RSS, memory store",
            f"<= {IDLE_RSS_MIB:.0f} MiB",
            f"{median(idle_kib) / 1024:.1f} MiB VmRSS 1 s after ready, one workspace warm "
            f"(min {min(idle_kib) / 1024:.1f}, max {worst:.1f}, {len(idle_kib)} starts; the "
            "default event loop, asyncio's: a plain install and the Docker image)",
            verdict(worst <= IDLE_RSS_MIB),
        )
    )
    if uvloop_kib:
        extra = (median(uvloop_kib) - median(idle_kib)) / 1024
        b.rows.append(
            Row(
                "idle RSS, memory store, event_loop: uvloop",
                "opt-in",
                f"{median(uvloop_kib) / 1024:.1f} MiB VmRSS 1 s after ready (min "
                f"{min(uvloop_kib) / 1024:.1f}, max {max(uvloop_kib) / 1024:.1f}, "
                f"{len(uvloop_kib)} starts): {extra:+.1f} MiB for uvloop, imported only when "
                "configured (the fast extra and event_loop: uvloop)",
                "INFO",
            )
        )
    b.rows.append(
        Row(
            "start to ready",
            f"<= {READY_S} s",
            f"{median(ready_s):.3f} s spawn to /readyz 200, median of {len(ready_s)} "
            f"(min {min(ready_s):.3f}, max {max(ready_s):.3f} s); includes login + 1 authtoken "
            "against the fake",
            verdict(median(ready_s) <= READY_S),
        )
    )


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def redis_idle(b: Bench, fake_url: str) -> None:
    """Idle RSS with ``token_store.type: redis`` (redis, the Fernet sealer and the shared
    wrappers loaded), against a throw-away redis-server."""
    redis = b.start_redis()
    if redis is None:
        b.rows.append(
            Row(
                "idle RSS, Redis store",
                f"<= {IDLE_RSS_REDIS_MIB:.0f} MiB",
                "skipped: redis-server is not installed (apt-get install redis-server)",
                "SKIP",
            )
        )
        return
    server, url = redis
    store = {"token_store": {"type": "redis", "url": url, "encryption_key": BENCH_FERNET_KEY}}
    kib: list[int] = []
    with b.procs.running(server):
        for i in range(2):
            kib.append(_idle_rss(b, f"proxy-redis-{i}", fake_url, extra=store)[1])
    b.results["redis_idle_rss_kib"] = kib
    b.rows.append(
        Row(
            "idle RSS, Redis store",
            f"<= {IDLE_RSS_REDIS_MIB:.0f} MiB",
            f"{median(kib) / 1024:.1f} MiB VmRSS 1 s after ready, one workspace warm "
            f"(max {max(kib) / 1024:.1f}, {len(kib)} starts; redis-server on loopback)",
            verdict(max(kib) / 1024 <= IDLE_RSS_REDIS_MIB),
        )
    )


@dataclass(slots=True)
class IdleWatch:
    """A warm proxy left without traffic while other steps run; its wake-ups are counted from
    :func:`start_idle_watch` to :func:`finish_idle_watch` (at least ``plan.idle_seconds``)."""

    proc: subprocess.Popen[bytes]
    started: float
    count: int


def start_idle_watch(b: Bench, fake_url: str) -> IdleWatch:
    proc, _, _, _ = b.start_proxy("proxy-idle", fake_url, WARM)
    time.sleep(1.0)  # past start-up's own activity
    return IdleWatch(proc, time.monotonic(), wakeups(proc.pid))


def finish_idle_watch(b: Bench, watch: IdleWatch) -> None:
    with b.procs.running(watch.proc):
        left = b.plan.idle_seconds - (time.monotonic() - watch.started)
        if left > 0:
            time.sleep(left)
        if watch.proc.poll() is not None:
            raise BenchError("the idle proxy exited while it was watched")
        seconds = time.monotonic() - watch.started
        count = wakeups(watch.proc.pid) - watch.count
        threads = len(list(Path(f"/proc/{watch.proc.pid}/task").iterdir()))
    rate = count / seconds
    b.results["idle_wakeups"] = {"seconds": seconds, "wakeups": count, "threads": threads}
    b.rows.append(
        Row(
            "idle wake-ups, no traffic",
            f"<= {WAKEUPS_PER_S:g}/s",
            f"{rate:.2f}/s: {count} voluntary context switches over {seconds:.0f} s, summed "
            f"over {threads} threads (reload_poll 2 s: one config stat every 2 s; token "
            "refreshes are hours apart)",
            verdict(rate <= WAKEUPS_PER_S),
        )
    )


def _dockerfile_check(path: Path) -> list[str]:
    """What the final stage does that a small image should not: a base that is not slim, or
    a compiler or package installation."""
    stages = re.split(r"(?im)^FROM\s", path.read_text())
    final = stages[-1]
    problems = []
    if "slim" not in final.splitlines()[0] and "distroless" not in final.splitlines()[0]:
        problems.append(f"final base is not slim ({final.splitlines()[0].strip()})")
    if re.search(r"(?i)\b(apt-get|apk|yum|dnf)\b.*\binstall\b", final):
        problems.append("the final stage installs packages")
    if re.search(r"\b(gcc|build-essential|make|g\+\+)\b", final):
        problems.append("build tools in the final stage")
    return problems


def image(b: Bench) -> None:
    dockerfile = ROOT / "Dockerfile"
    problems = _dockerfile_check(dockerfile)
    shape = "slim base, no build tools in the final stage" if not problems else "; ".join(problems)
    tool = next((t for t in ("docker", "podman") if shutil.which(t)), None)
    reason = None
    if tool is None:
        reason = "neither docker nor podman is installed"
    else:
        info = subprocess.run([tool, "info"], capture_output=True, text=True, timeout=30)  # noqa: S603
        if info.returncode != 0:
            tail = (info.stderr or info.stdout).strip().splitlines()[-1:]
            reason = f"{tool} cannot reach a daemon ({' '.join(tail)[:120]})"
    target = "slim, no build tools; size reported"
    if reason is not None:
        layer = _layer(b)
        b.rows.append(
            Row(
                "container image",
                target,
                f"skipped: {reason}; Dockerfile: {shape}; {layer}",
                "SKIP",
            )
        )
        return
    assert tool is not None
    tag = "royalti-auth-proxy:bench"
    built = subprocess.run(  # noqa: S603
        [tool, "build", "--quiet", "--tag", tag, "--file", str(dockerfile), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if built.returncode != 0:
        raise BenchError(f"{tool} build failed: {built.stderr.strip().splitlines()[-1:]}")
    size = subprocess.run(  # noqa: S603
        [tool, "image", "inspect", "--format", "{{.Size}}", tag],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    mb = int(size) / 1e6
    b.results["image_bytes"] = int(size)
    b.rows.append(
        Row(
            "container image",
            target,
            f"{mb:.0f} MB ({tool}); Dockerfile: {shape}",
            verdict(not problems),
        )
    )


def _layer(b: Bench) -> str:
    """What the Dockerfile's final stage copies onto the slim base image, built the way its
    first stage builds it but outside a container: a virtual environment with the project's
    wheel and its dependencies (no extra: uvloop is opt-in), pip and setuptools removed, the
    bytecode compiled. The base image itself cannot be measured without a container builder."""
    with tempfile.TemporaryDirectory(prefix="royalti-layer-") as tmp:
        root = Path(tmp)
        venv = root / "venv"
        pip = str(venv / "bin" / "pip")
        try:
            for argv in (
                [PY, "-m", "venv", str(venv)],
                [pip, "install", "--quiet", str(ROOT)],  # builds the wheel, installs it
                [pip, "uninstall", "--quiet", "--yes", "pip", "setuptools"],
                [str(venv / "bin" / "python"), "-m", "compileall", "-q", str(venv / "lib")],
            ):
                subprocess.run(argv, check=True, capture_output=True, timeout=600)  # noqa: S603
        except (subprocess.SubprocessError, OSError) as exc:
            return f"the layer could not be built outside a container either ({exc})"
        total = _du(venv)
        site = next((venv / "lib").glob("python*/site-packages"))
        sizes: dict[str, int] = {}
        for entry in site.iterdir():
            name = entry.name.split("-")[0].removesuffix(".py").lower()
            if name.startswith(("_", "__")) or name.endswith("_info"):
                continue
            sizes[name] = sizes.get(name, 0) + _du(entry)
        top = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
        b.results["image_layer_bytes"] = total
        b.results["image_layer_packages"] = sizes
        largest = ", ".join(f"{n} {v / 1e6:.1f}" for n, v in top)
        return (
            f"the layer it adds to python:3.11-slim-bookworm, built the same way outside a "
            f"container: {total / 1e6:.0f} MB (largest, MB: {largest})"
        )


def _du(path: Path) -> int:
    """Bytes of the files under ``path`` (or of ``path``), as the image layer holds them."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
