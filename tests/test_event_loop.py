"""The event loop: ``event_loop`` in the configuration (asyncio by default, uvloop opt-in and
checked at load), ``ROYALTI_PROXY_LOOP`` over it, and the command line's choice between them.
The real process on each loop, and what it imports, is in tests/test_imports.py."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

import proxy.__main__ as cli
from proxy.app import loop_name
from proxy.config import UVLOOP_MISSING, build, from_environment
from proxy.errors import ConfigError
from tests.conftest import royalti_config

MISSING_LINE = "pip install 'royalti-auth-proxy[fast]'"
ENV_ONLY = {"ROYALTI_API_KEY": "k"}


@pytest.fixture
def no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop cannot be imported (nor found by importlib.util.find_spec), as without the extra."""
    monkeypatch.setitem(sys.modules, "uvloop", None)


def test_the_default_event_loop_is_asyncio() -> None:
    assert build(royalti_config("http://127.0.0.1:1"), {}, source="test").event_loop == "asyncio"
    assert from_environment(ENV_ONLY).event_loop == "asyncio"


def test_event_loop_uvloop_without_uvloop_is_a_configuration_error(no_uvloop: None) -> None:
    data = {**royalti_config("http://127.0.0.1:1"), "event_loop": "uvloop"}
    with pytest.raises(ConfigError) as caught:
        build(data, {}, source="test")
    assert caught.value.problems == [f"event_loop: {UVLOOP_MISSING}"]
    assert MISSING_LINE in UVLOOP_MISSING


def test_the_environment_only_mode_reads_royalti_proxy_event_loop() -> None:
    with pytest.raises(ConfigError) as caught:
        from_environment({**ENV_ONLY, "ROYALTI_PROXY_EVENT_LOOP": "trio"})
    assert caught.value.problems == ["event_loop: must be one of asyncio, uvloop (got 'trio')"]


def test_check_config_reports_event_loop_uvloop_without_uvloop(
    no_uvloop: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "event_loop: uvloop\n"
        "upstreams: [{name: own, url: 'http://127.0.0.1:1', auth: {type: static, token: t}}]\n"
    )
    assert cli.main(["check-config", "--config", str(path)], env={}) == 2
    assert capsys.readouterr().err.splitlines() == [f"royalti-proxy: event_loop: {UVLOOP_MISSING}"]


@pytest.mark.parametrize(
    ("value", "installed", "chosen"),
    [
        ("", True, None),  # not set: the configuration's event_loop decides
        ("asyncio", True, "asyncio"),
        ("uvloop", True, "uvloop"),
        ("auto", True, "uvloop"),
        ("auto", False, "asyncio"),
    ],
)
def test_royalti_proxy_loop_overrides_the_configuration(
    value: str, installed: bool, chosen: str | None
) -> None:
    env = {"ROYALTI_PROXY_LOOP": value} if value else {}
    assert cli.loop_override(env, installed=lambda: installed) == chosen


def test_royalti_proxy_loop_uvloop_without_uvloop_says_what_to_install() -> None:
    with pytest.raises(ConfigError) as caught:
        cli.loop_override({"ROYALTI_PROXY_LOOP": "uvloop"}, installed=lambda: False)
    assert caught.value.problems == [f"ROYALTI_PROXY_LOOP: {UVLOOP_MISSING}"]


@pytest.mark.parametrize("command", ["run", "check-config", "demo"])
def test_another_royalti_proxy_loop_value_exits_2_with_the_reason(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([command], env={**ENV_ONLY, "ROYALTI_PROXY_LOOP": "fast"}) == 2
    assert capsys.readouterr().err.splitlines() == [
        "royalti-proxy: ROYALTI_PROXY_LOOP: must be one of asyncio, uvloop, auto (got 'fast')"
    ]


def test_royalti_proxy_loop_uvloop_without_uvloop_exits_2(
    no_uvloop: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["run"], env={**ENV_ONLY, "ROYALTI_PROXY_LOOP": "uvloop"}) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"royalti-proxy: ROYALTI_PROXY_LOOP: {UVLOOP_MISSING}"
    ]


@pytest.fixture
def chosen(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The loops the command line would run on: ``run`` records its loop and closes the
    coroutine instead of running it (and the logging setup of ``run``/``demo`` is skipped)."""
    loops: list[str] = []

    def record(main: Coroutine[Any, Any, int], loop: str = "asyncio") -> int:
        main.close()
        loops.append(loop)
        return 0

    monkeypatch.setattr(cli, "run", record)
    monkeypatch.setattr(cli.logs, "setup", lambda *args: None)
    return loops


@pytest.mark.parametrize(
    ("env", "loop"),
    [
        ({}, "asyncio"),
        ({"ROYALTI_PROXY_LOOP": "asyncio"}, "asyncio"),
        ({"ROYALTI_PROXY_EVENT_LOOP": "asyncio", "ROYALTI_PROXY_LOOP": "auto"}, None),
    ],
)
def test_run_uses_the_configured_loop_unless_royalti_proxy_loop_says_otherwise(
    chosen: list[str], env: dict[str, str], loop: str | None
) -> None:
    assert cli.main(["run"], env={**ENV_ONLY, **env}) == 0
    # auto: uvloop where it is installed, whatever the configuration says.
    expected = loop or ("uvloop" if cli.uvloop_installed() else "asyncio")
    assert chosen == [expected]


@pytest.mark.skipif(not cli.uvloop_installed(), reason="uvloop (the fast extra) is not installed")
def test_run_uses_event_loop_uvloop_and_royalti_proxy_loop_asyncio_overrides_it(
    chosen: list[str],
) -> None:
    env = {**ENV_ONLY, "ROYALTI_PROXY_EVENT_LOOP": "uvloop"}
    assert cli.main(["run"], env=env) == 0
    assert cli.main(["run"], env={**env, "ROYALTI_PROXY_LOOP": "asyncio"}) == 0
    assert chosen == ["uvloop", "asyncio"]


def test_demo_runs_on_asyncio_unless_royalti_proxy_loop_says_otherwise(chosen: list[str]) -> None:
    assert cli.main(["demo"], env={}) == 0
    assert cli.main(["demo"], env={"ROYALTI_PROXY_LOOP": "asyncio"}) == 0
    assert chosen == ["asyncio", "asyncio"]


def test_run_on_asyncio_never_imports_uvloop(no_uvloop: None) -> None:
    # With uvloop unimportable, the default loop still runs: run() does not try to import it.
    async def loop_module() -> int:
        return 0 if loop_name(asyncio.get_running_loop()) == "asyncio" else 1

    assert cli.run(loop_module()) == 0
