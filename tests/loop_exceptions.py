"""Every call to an event loop's exception handler fails the test that caused it.

asyncio reports what nobody awaited through the loop's exception handler: an exception raised
by a callback (``Exception in callback ...``), a task whose exception was never retrieved, an
exception in a protocol's ``connection_lost``, an error while the loop shuts down. By default
that is only an ERROR line in the log, and the test that caused it passes. This plugin, loaded
by ``tests/conftest.py`` for the whole suite (``tests/faults`` included):

* builds every test's event loop through pytest-asyncio's ``pytest_asyncio_loop_factories``
  hook, with a handler that records each call (and still logs it the default way);
* after each test's teardown (its loop closed, a garbage collection run so that a task dropped
  with an exception is reported now and not in some later test) fails that test with the list
  of what was recorded;
* fails the session for anything recorded outside a test.

``loop_exceptions`` (the fixture) gives a test the recorder, so that a test which provokes such
an exception on purpose can take its records and assert on them.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass
class LoopExceptions:
    """What the loops' exception handlers were called with, per test."""

    current: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    """This test's calls: the ``context`` dicts asyncio passed to the handler."""
    stray: list[str] = field(default_factory=list)
    """Calls made while no test ran (collection, session end)."""
    loops: int = 0
    """Loops made for this test: a test without one leaves no task to collect."""

    def handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if self.current is None:
            self.stray.append(describe(context))
        else:
            self.records.append(context)
        loop.default_exception_handler(context)

    def take(self) -> list[dict[str, Any]]:
        """This test's records so far, removed: a test that provokes one on purpose."""
        taken, self.records = self.records, []
        return taken


def describe(context: Mapping[str, Any]) -> str:
    exc = context.get("exception")
    parts = [str(context.get("message", "?"))]
    if exc is not None:
        parts.append(f"{type(exc).__name__}: {exc}")
    for key in ("handle", "task", "future", "protocol", "transport"):
        if key in context:
            parts.append(f"{key}={context[key]!r:.200}")
    return "; ".join(parts)


recorder = LoopExceptions()


def new_event_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(recorder.handle)
    recorder.loops += 1
    return loop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    return {"recorded": new_event_loop}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    recorder.current = item.nodeid
    recorder.records = []
    recorder.loops = 0
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        result = yield
    finally:
        # A task dropped with its exception unretrieved reports when it is collected: now,
        # while it still counts as this test's. (Only after a test that had a loop: a full
        # collection per test would double the time of the suite's many synchronous ones.)
        if recorder.loops:
            gc.collect()
        found, recorder.records, recorder.current = recorder.records, [], None
    if found:
        lines = "\n".join(f"  - {describe(c)}" for c in found)
        pytest.fail(
            f"the event loop's exception handler was called {len(found)} time(s):\n{lines}",
            pytrace=False,
        )
    return result


@pytest.fixture
def loop_exceptions() -> LoopExceptions:
    """The recorder: ``take()`` removes this test's records (for a test that provokes one)."""
    return recorder


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    gc.collect()
    if recorder.stray and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in recorder.stray:
        terminalreporter.write_line(f"loop exception outside any test: {line}", red=True)
