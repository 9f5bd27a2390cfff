"""The shared token store: where replicas keep the tokens and refresh credentials they share.

``records`` holds the types the token layer sees (no Redis import); ``seal`` encrypts every value;
``redis_store`` is the Redis implementation, imported only when ``token_store.type`` is redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.store.records import Lease, Names, Record, Snapshot, StoreUnavailable

if TYPE_CHECKING:
    from proxy.clock import Clock
    from proxy.config import TokenStoreConfig
    from proxy.store.redis_store import RedisStore

__all__ = ["Lease", "Names", "Record", "Snapshot", "StoreUnavailable", "open_store"]


def open_store(config: TokenStoreConfig, *, clock: Clock) -> RedisStore | None:
    """The shared store ``config`` describes, or None for ``type: memory``."""
    if config.type != "redis":
        return None
    from proxy.store.redis_store import RedisStore

    return RedisStore.from_config(config, clock=clock)
