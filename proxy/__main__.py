"""Command line: ``royalti-proxy [run|check-config|config-schema|demo] [--config PATH] ...``.

The environment is read here and nowhere else; everything below takes it as an argument.
Exit codes: 0 clean exit, 1 runtime failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

# First, for its side effect: switches that must be set before aiohttp is imported (see it).
import proxy.lean  # noqa: F401
from proxy import __version__, logs
from proxy.app import Proxy
from proxy.config import UVLOOP_MISSING, Config, EventLoop, load, uvloop_installed
from proxy.errors import ConfigError

log = logging.getLogger("proxy")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="royalti-proxy",
        description="Authenticating reverse-proxy sidecar for the Royalti.io API.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", "-c", help="YAML configuration file (default: $ROYALTI_PROXY_CONFIG)"
    )
    common.add_argument("--log-format", choices=("json", "text"), help="overrides log_format")
    common.add_argument("--log-level", help="overrides log_level (debug, info, warning, error)")
    sub.add_parser("run", parents=[common], help="run the proxy (the default)")
    sub.add_parser("check-config", parents=[common], help="validate the configuration and exit")
    sub.add_parser("config-schema", help="print the JSON Schema of the configuration file")
    demo = sub.add_parser(
        "demo", parents=[common], help="run the proxy in front of an embedded fake Royalti API"
    )
    demo.add_argument("--listen", default="127.0.0.1:8080", help="proxy listen address")
    demo.add_argument("--admin-listen", default="127.0.0.1:9090", help="admin listen address")
    return p


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (
        args_list[0].startswith("-") and args_list[0] not in ("-h", "--help", "--version")
    ):
        args_list.insert(0, "run")
    args = parser().parse_args(args_list)
    command = args.command or "run"

    if command == "config-schema":
        from proxy.config.schema import schema_text

        sys.stdout.write(schema_text())
        return 0
    try:
        override = loop_override(env)
    except ConfigError as exc:
        return report(exc)
    if command == "demo":
        from proxy.demo import running

        logs.setup(args.log_format or "text", (args.log_level or "INFO").upper())
        return run(serve(running(args.listen, args.admin_listen)), override or "asyncio")

    try:
        config = load(args.config, env)
    except ConfigError as exc:
        return report(exc)
    if command == "check-config":
        names = ", ".join(f"{u.name} ({u.auth_type}, {u.path_prefix})" for u in config.upstreams)
        print(f"configuration OK ({config.source}): upstreams {names}")
        for up in config.upstreams:
            # Proxy URLs here never hold credentials: those were split off at load.
            route = up.proxy.describe() if up.proxy is not None else "direct"
            token = up.token_proxy.describe() if up.token_proxy is not None else "direct"
            print(f"  {up.name}: egress {route}; token endpoint egress {token}")
        return 0
    logs.setup(args.log_format or config.log_format, (args.log_level or config.log_level).upper())
    reload_path = args.config

    def reload_source() -> Config:
        return load(reload_path, env)

    return run(serve(Proxy(config, reload_source=reload_source)), override or config.event_loop)


def report(exc: ConfigError) -> int:
    for line in exc.problems:
        print(f"royalti-proxy: {line}", file=sys.stderr)
    return 2


#: The values of ``ROYALTI_PROXY_LOOP``; ``auto`` is uvloop when it is installed.
LOOP_OVERRIDES = ("asyncio", "uvloop", "auto")


def loop_override(
    env: Mapping[str, str], *, installed: Callable[[], bool] = uvloop_installed
) -> EventLoop | None:
    """The event loop ``ROYALTI_PROXY_LOOP`` asks for instead of the configuration's
    ``event_loop`` (None: not set, the configuration decides)."""
    value = env.get("ROYALTI_PROXY_LOOP", "")
    if not value:
        return None
    if value not in LOOP_OVERRIDES:
        choices = ", ".join(LOOP_OVERRIDES)
        raise ConfigError([f"ROYALTI_PROXY_LOOP: must be one of {choices} (got {value!r})"])
    if value == "asyncio":
        return "asyncio"
    if installed():
        return "uvloop"
    if value == "uvloop":
        raise ConfigError([f"ROYALTI_PROXY_LOOP: {UVLOOP_MISSING}"])
    return "asyncio"


def run(main: Coroutine[Any, Any, int], loop: EventLoop = "asyncio") -> int:
    """Run ``main`` on asyncio's own loop or on uvloop, which is imported only then."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


#: How long a forced exit waits for the cancelled drain to unwind before it returns anyway.
FORCE_GRACE = 1.0


class Signals:
    """What SIGTERM and SIGINT asked for. The handlers only record it, as uvicorn's do; the
    serving loop acts on it, so nothing runs inside a handler that could block or exit the
    process from under the event loop (no ``os._exit`` in a handler)."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        """Set by the first signal: drain and exit."""
        self.force = asyncio.Event()
        """Set by the second: stop draining and exit now."""
        self.first: str | None = None

    def handle(self, signame: str) -> None:
        if self.first is None:
            self.first = signame
            self.stop.set()
        else:
            self.force.set()


async def serve(running: contextlib.AbstractAsyncContextManager[Proxy]) -> int:
    """Run until SIGTERM or SIGINT; a second signal exits at once (code 1)."""
    loop = asyncio.get_running_loop()
    signals = Signals()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.handle, sig.name)
    main = asyncio.ensure_future(_serve(running, signals))
    forced = asyncio.ensure_future(signals.force.wait())
    try:
        await asyncio.wait({main, forced}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        forced.cancel()
    if main.done():
        return main.result()
    log.warning("second signal: exiting now", extra={"event": "forced_exit"})
    main.cancel()
    # Bounded: a drain that does not unwind promptly is left to the loop's own shutdown.
    await asyncio.wait({main}, timeout=FORCE_GRACE)
    return 1


async def _serve(running: contextlib.AbstractAsyncContextManager[Proxy], signals: Signals) -> int:
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[bool]] = set()
    try:
        async with running as proxy:

            def on_hangup() -> None:
                log.info(
                    "reload requested", extra={"event": "reload_requested", "signal": "SIGHUP"}
                )
                task = asyncio.ensure_future(proxy.reload())
                reloads.add(task)
                task.add_done_callback(reloads.discard)

            loop.add_signal_handler(signal.SIGHUP, on_hangup)
            quit_requested = asyncio.ensure_future(proxy.quit.wait())
            signalled = asyncio.ensure_future(signals.stop.wait())
            await asyncio.wait({quit_requested, signalled}, return_when=asyncio.FIRST_COMPLETED)
            for task in (quit_requested, signalled):
                task.cancel()
            if signals.first is not None:
                log.info("shutting down", extra={"event": "shutdown", "signal": signals.first})
    except OSError as exc:
        log.error("cannot start", extra={"event": "start_failed", "error": str(exc)})
        return 1
    except ConfigError as exc:
        for line in exc.problems:
            print(f"royalti-proxy: {line}", file=sys.stderr)
        return 2
    log.info("stopped", extra={"event": "stopped"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
