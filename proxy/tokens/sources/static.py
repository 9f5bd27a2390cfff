"""A credential that needs no exchange: a Royalti API key (``RWAK...``/``RUAK...``) or any static
token, from a value or from a file that is re-read when it changes."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from proxy.clock import Clock
from proxy.errors import CredentialRejected
from proxy.secret import Secret
from proxy.tokens.source import CredentialStatus
from proxy.tokens.token import Token


class StaticSource:
    """Hands out one configured credential.

    Neither expires (``Token.expires`` is False). A value is given an infinite lifetime, so the
    token manager never renews it. A credential from a file is given ``poll_interval`` of life,
    so the token manager re-reads the file about that often: Kubernetes replaces secret files by
    swapping a symlink, which a stat of the path sees. When the file is unreadable the last value
    keeps being served.
    """

    per_workspace = False

    def __init__(
        self,
        *,
        kind: str,
        value: Secret | None = None,
        path: str | None = None,
        read_file: Callable[[str], Secret] | None = None,
        clock: Clock,
        poll_interval: float = 10.0,
    ) -> None:
        if (value is None) == (path is None):
            raise ValueError("exactly one of value and path")
        self.kind = kind
        self._value = value
        self._path = path
        self._read = read_file
        self._clock = clock
        self._poll = poll_interval
        self._stat: tuple[int, int, float] | None = None

    async def fetch(self, key: str) -> Token:
        now, wall = self._clock.monotonic(), self._clock.wall()
        if self._path is None:
            assert self._value is not None
            return Token(self._value.reveal(), now, math.inf, math.inf, expires=False)
        secret = self._load()
        return Token(secret.reveal(), now, self._poll, wall + self._poll, expires=False)

    def _load(self) -> Secret:
        assert self._path is not None and self._read is not None
        try:
            st = os.stat(self._path)
            stat = (st.st_ino, st.st_size, st.st_mtime)
            if self._value is None or stat != self._stat:
                self._value = self._read(self._path)
                self._stat = stat
        except (OSError, UnicodeDecodeError) as exc:
            if self._value is not None:
                return self._value
            raise CredentialRejected("CREDENTIAL_FILE", "cannot read the credential file") from exc
        if not self._value:
            raise CredentialRejected("CREDENTIAL_FILE", "the credential file is empty")
        return self._value

    def credential_status(self) -> CredentialStatus | None:
        return None

    async def close(self) -> None:
        return None
