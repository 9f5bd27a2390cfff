"""Encryption of everything the proxy writes to the shared store (``cryptography``'s Fernet:
AES-128-CBC with HMAC-SHA256, authenticated).

A sealed value also names the key it was written under, and opening checks it: a ciphertext
copied by someone with write access to Redis from one key to another (say from one workspace's
token to another's) reads as absent, not as a valid token for the wrong key.

The key material is one or more Fernet keys, parsed and checked at load
(:class:`proxy.config.EncryptionKeys`): the first encrypts, all of them decrypt, so keys can be
rotated without a flag day (add the new key second, roll out, move it first, roll out, remove
the old one).
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class Sealer:
    """Encrypts and authenticates JSON payloads bound to a key name."""

    def __init__(self, keys: list[bytes]) -> None:
        self._fernet = MultiFernet([Fernet(k) for k in keys])

    def seal(self, name: str, payload: dict[str, Any]) -> bytes:
        body = json.dumps({"n": name, "p": payload}, separators=(",", ":")).encode()
        return self._fernet.encrypt(body)

    def open(self, name: str, blob: bytes) -> dict[str, Any] | None:
        """The payload sealed under ``name``; None when it does not decrypt with any of our keys
        or was sealed under another name."""
        try:
            body = json.loads(self._fernet.decrypt(blob))
        except (InvalidToken, ValueError):
            return None
        if not isinstance(body, dict) or body.get("n") != name:
            return None
        payload = body.get("p")
        return payload if isinstance(payload, dict) else None
