"""The replacement for a token an upstream rejected: the one mechanism behind the single replay
of a request (:mod:`proxy.forward`) and of a WebSocket handshake (:mod:`proxy.websocket`)."""

from __future__ import annotations

from proxy.errors import TokenUnavailable
from proxy.tokens.manager import TokenManager
from proxy.tokens.token import Token


async def replacement(manager: TokenManager, key: str, rejected: Token) -> Token | None:
    """A token to try instead of ``rejected``, or None when there is none worth a retry.

    ``rejected`` is dropped only if it is still the cached one (compare-and-invalidate), so a
    burst of rejections of one token causes one renewal. None when no token can be had now (the
    caller has nothing better than the upstream's own answer) or when the manager hands back the
    same value (another request renewed it already and the upstream rejected that one too).
    """
    manager.invalidate(key, rejected)
    try:
        fresh = await manager.get(key)
    except TokenUnavailable:
        return None
    return None if fresh.value == rejected.value else fresh
