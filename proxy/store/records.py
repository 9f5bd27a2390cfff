"""What the shared store hands back, and the one error it raises. No Redis import in here, so the
token layer can name these types without loading a Redis client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class StoreUnavailable(Exception):
    """The store did not answer within its timeout, refused the connection, or is known to be
    down: the caller carries on with its local cache and local renewal.

    ``maybe_applied`` is True when a write was sent and its fate is unknown (a timeout after
    sending): a refresh token that may now be in the store must not also be kept for local use.
    """

    def __init__(self, message: str, *, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


@dataclass(frozen=True, slots=True)
class Names:
    """The keys of one shared item: its value, its renewal lease and its failure note.

    They share one hash tag (the part in braces), so a script that touches them all is valid
    under Redis Cluster too.
    """

    value: str
    lock: str
    failed: str

    @classmethod
    def of(cls, prefix: str, kind: str, scope: str) -> Names:
        """The keys of the item ``kind`` (``token`` or ``credential``) of ``scope``, under
        ``prefix``: ``P:K:{S}``, ``P:lock:K:{S}``, ``P:failed:K:{S}``."""
        tag = "{" + scope + "}"
        return cls(
            value=f"{prefix}:{kind}:{tag}",
            lock=f"{prefix}:lock:{kind}:{tag}",
            failed=f"{prefix}:failed:{kind}:{tag}",
        )


@dataclass(frozen=True, slots=True)
class Record:
    """A stored value as read.

    ``version`` counts writes (fencing); ``remaining`` is how long the value has left, measured
    on the Redis server's clock, the one clock every replica shares; ``payload`` is the decrypted
    content, None when there is none (never written, expired, spent or unreadable).
    """

    version: int
    remaining: float
    payload: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One item's state in one round trip: the value, whether a lease is held, and the failure
    a replica recorded when its renewal failed (None when there is none)."""

    record: Record
    locked: bool
    failure: dict[str, Any] | None


@dataclass(slots=True, eq=False)
class Lease:
    """A renewal lease: ``owner`` is random per acquisition; ``lost`` turns True when it could
    not be extended (it expired, or another owner holds it now)."""

    names: Names
    owner: str
    lost: bool = False
