"""Process-wide switches the command line sets before aiohttp is first imported: imported first
by :mod:`proxy.__main__`, for its side effect, and by nothing else.

``FROZENLIST_NO_EXTENSIONS=1``: frozenlist (an aiohttp dependency) then uses its pure-Python
``FrozenList`` instead of its C extension. That extension is compiled as C++ and maps libstdc++
into the process, about 1.1 MiB of an idle proxy's memory (docs/configuration.md), while aiohttp
only uses ``FrozenList`` for its signals, when an application is set up, never per request.
frozenlist reads the variable once, when it is imported, so this must run before anything
imports aiohttp. ``setdefault``: a variable set to the empty string keeps the C extension.
"""

from __future__ import annotations

import os

os.environ.setdefault("FROZENLIST_NO_EXTENSIONS", "1")
