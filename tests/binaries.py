"""External programs some tests drive (``promtool``, ``prometheus``).

Absent on a developer's machine, such a test is skipped; absent under CI (``CI`` set), it fails,
so that a missing install step cannot turn a red build green.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_binary(name: str) -> str:
    """The path of the program ``name`` on ``PATH``; skip the test (fail it under CI) without."""
    path = shutil.which(name)
    if path is not None:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is required under CI")
    pytest.skip(f"{name} is not installed")
