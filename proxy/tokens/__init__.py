"""Everything about credentials: tokens, the sources that fetch them, and the manager that caches
and renews them. Nothing in this package imports ``aiohttp.web``."""

from proxy.tokens.entry import TokenState
from proxy.tokens.manager import TokenManager
from proxy.tokens.source import TokenSource
from proxy.tokens.token import Token, fingerprint

__all__ = ["Token", "TokenManager", "TokenSource", "TokenState", "fingerprint"]
