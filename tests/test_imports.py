"""What the process imports: only what its configuration uses (docs/performance.md).

Each check runs in a fresh interpreter, since this test process has imported everything already.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config import uvloop_installed
from tests.conftest import free_port

ROOT = Path(__file__).parent.parent

#: The environment of every fresh interpreter here: nothing of this one's (this test process has
#: imported proxy.__main__, which sets FROZENLIST_NO_EXTENSIONS in its own environment).
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}

# Modules a configuration without a shared store (or without a file) must never load.
ONLY_WHEN_CONFIGURED = ("yaml", "redis", "proxy.store.redis_store", "proxy.store.seal")


def loaded_after(script: str) -> list[str]:
    """Which of ONLY_WHEN_CONFIGURED, cryptography, PyJWT and msgspec ``script`` leaves in
    sys.modules (the proxy reads JWT claims itself: PyJWT is never imported, cryptography only
    for the Redis store's sealing, msgspec only to write the configuration's JSON Schema)."""
    watched = (*ONLY_WHEN_CONFIGURED, "cryptography.fernet", "cryptography", "jwt", "msgspec")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys\n{script}\nimport json\n"
            f"print(json.dumps([m for m in {watched!r} if m in sys.modules]))",
        ],
        env=CLEAN_ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


UPSTREAM = (
    "upstreams:\n"
    "  - {name: royalti, url: 'https://api.royalti.io', path_prefix: /,\n"
    "     auth: {type: royalti, api_key: k}}\n"
)

APP_PATH = """
import proxy.__main__
from proxy.clock import SystemClock
from proxy.config import load
from proxy.store import open_store
"""


def test_an_environment_only_configuration_imports_no_yaml_redis_or_fernet() -> None:
    script = APP_PATH + (
        "config = load(None, {'ROYALTI_API_KEY': 'k', 'ROYALTI_WORKSPACE': 'w'})\n"
        "assert open_store(config.token_store, clock=SystemClock()) is None\n"
    )
    assert loaded_after(script) == []


def test_a_yaml_configuration_with_the_memory_store_imports_no_redis_or_fernet(
    tmp_path: Path,
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(UPSTREAM)
    script = APP_PATH + (
        f"config = load({str(path)!r}, {{}})\n"
        "assert open_store(config.token_store, clock=SystemClock()) is None\n"
    )
    assert loaded_after(script) == ["yaml"]


def test_a_redis_store_imports_redis_and_fernet_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    key = "A" * 43 + "="
    path.write_text(
        UPSTREAM
        + f"token_store: {{type: redis, url: 'redis://127.0.0.1:1', encryption_key: '{key}'}}\n"
    )
    script = APP_PATH + (
        f"config = load({str(path)!r}, {{}})\n"
        "assert open_store(config.token_store, clock=SystemClock()) is not None\n"
    )
    assert loaded_after(script) == [*ONLY_WHEN_CONFIGURED, "cryptography.fernet", "cryptography"]


def test_a_json_configuration_is_read_without_the_yaml_parser(tmp_path: Path) -> None:
    path = tmp_path / "proxy.json"
    data = {
        "upstreams": [
            {
                "name": "royalti",
                "url": "https://api.royalti.io",
                "path_prefix": "/",
                "auth": {"type": "royalti", "api_key": "${KEY}"},
            }
        ]
    }
    path.write_text(json.dumps(data))
    script = APP_PATH + (
        f"config = load({str(path)!r}, {{'KEY': 'k'}})\n"
        "assert config.upstreams[0].auth.api_key.load().reveal() == 'k'\n"
        "assert open_store(config.token_store, clock=SystemClock()) is None\n"
    )
    assert loaded_after(script) == []


def test_only_the_schema_command_imports_msgspec() -> None:
    assert loaded_after("from proxy.config.schema import schema_text\nschema_text()") == ["msgspec"]


# -- the event loop and frozenlist's C++ extension -------------------------------------------

#: Run after ``import proxy.__main__``: what it loaded, and whether libstdc++ is mapped.
NATIVE = """
import json, sys
with open("/proc/self/maps") as maps:
    libstdcxx = any("libstdc++" in line for line in maps)
watched = ("uvloop", "frozenlist", "frozenlist._frozenlist")
print(json.dumps({"modules": [m for m in watched if m in sys.modules], "libstdc++": libstdcxx}))
"""


def after_the_command_line(env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", "import proxy.__main__\n" + NATIVE],
        env={**CLEAN_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def test_the_command_line_loads_frozenlist_without_its_cxx_extension_and_no_uvloop() -> None:
    # frozenlist itself is loaded (aiohttp's signals use it): its pure-Python FrozenList.
    assert after_the_command_line() == {"modules": ["frozenlist"], "libstdc++": False}


@pytest.mark.skipif(
    importlib.util.find_spec("frozenlist._frozenlist") is None,
    reason="this frozenlist install has no C extension",
)
def test_frozenlist_no_extensions_set_empty_brings_the_cxx_extension_back() -> None:
    found = after_the_command_line({"FROZENLIST_NO_EXTENSIONS": ""})
    assert found == {"modules": ["frozenlist", "frozenlist._frozenlist"], "libstdc++": True}


@contextlib.asynccontextmanager
async def running(tmp_path: Path, extra: str = "") -> AsyncIterator[tuple[dict[str, Any], str]]:
    """``python -m proxy run`` on a file with one upstream and ``extra``, in a clean environment:
    its ``started`` log record and its /proc/PID/maps once it has started. Stopped with SIGTERM,
    which must exit 0."""
    path = tmp_path / "proxy.yaml"
    path.write_text(
        f"listen: 127.0.0.1:{free_port()}\n"
        f"admin: {{listen: 127.0.0.1:{free_port()}}}\n"
        "log_format: json\n"
        "upstreams:\n"
        "  - {name: own, url: 'http://127.0.0.1:1', auth: {type: static, token: t}}\n" + extra
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--config",
        str(path),
        env=CLEAN_ENV,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        started = await asyncio.wait_for(started_record(proc.stderr), 30)
        maps = await asyncio.to_thread(Path(f"/proc/{proc.pid}/maps").read_text)
        yield started, maps
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def started_record(stream: asyncio.StreamReader) -> dict[str, Any]:
    lines = []
    while line := await stream.readline():
        lines.append(line.decode(errors="replace"))
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == "started":
                assert isinstance(record, dict)
                return record
    raise AssertionError("the proxy exited before it started:\n" + "".join(lines))


async def test_a_run_with_the_default_event_loop_is_on_asyncio_without_uvloop_or_libstdcxx(
    tmp_path: Path,
) -> None:
    # Whether or not uvloop is installed: installing the fast extra no longer changes the loop.
    async with running(tmp_path) as (started, maps):
        assert started["event_loop"] == "asyncio"
        assert "uvloop" not in maps
        assert "libstdc++" not in maps
        assert "_frozenlist" not in maps


@pytest.mark.skipif(not uvloop_installed(), reason="uvloop (the fast extra) is not installed")
async def test_event_loop_uvloop_runs_the_proxy_on_uvloop(tmp_path: Path) -> None:
    async with running(tmp_path, "event_loop: uvloop\n") as (started, maps):
        assert started["event_loop"] == "uvloop"
        assert "uvloop" in maps
