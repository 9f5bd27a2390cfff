"""The signal handlers only record what was asked (the real process's behaviour on real signals
is in tests/test_shutdown.py)."""

from __future__ import annotations

import ast
import inspect

import proxy.__main__ as cli
from proxy.__main__ import Signals


async def test_the_first_signal_asks_for_a_drain_and_the_second_for_a_prompt_exit() -> None:
    signals = Signals()
    signals.handle("SIGTERM")
    assert signals.stop.is_set() and not signals.force.is_set()
    assert signals.first == "SIGTERM"
    signals.handle("SIGINT")
    assert signals.force.is_set()
    assert signals.first == "SIGTERM"  # the one the shutdown log names


def test_nothing_in_the_command_line_calls_os_exit() -> None:
    tree = ast.parse(inspect.getsource(cli))
    calls = [
        node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "_exit"
    ]
    assert calls == []
