"""The shared token store: where replicas keep the tokens and refresh credentials they share.

``records`` holds the types the token layer sees and ``base`` the protocol it calls (no Redis
import in either); ``seal`` encrypts every value; ``redis_store`` is the Redis implementation,
imported only when ``token_store.type`` is redis; ``memory`` keeps the same leases and fencing in
this process, for tests (not selectable in the configuration).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.store.records import Lease, Names, Record, Snapshot, StoreUnavailable

if TYPE_CHECKING:
    from proxy.clock import Clock
    from proxy.config import TokenStoreConfig
    from proxy.store.base import SharedStore

__all__ = ["Lease", "Names", "Record", "Snapshot", "StoreUnavailable", "open_store"]


def open_store(config: TokenStoreConfig, *, clock: Clock) -> SharedStore | None:
    """The shared store ``config`` describes, or None for ``type: memory``."""
    if config.type != "redis":
        return None
    from proxy.store.redis_store import RedisStore

    return RedisStore.from_config(config, clock=clock)
