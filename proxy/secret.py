"""A string that never shows itself."""

from __future__ import annotations


class Secret:
    """Wraps a password, client secret, refresh token or API key.

    ``str()``, ``repr()`` and formatting print ``***``, so a secret that slips into a log call,
    an exception message or a dataclass repr stays hidden. Call :meth:`reveal` where the value
    really is needed (on the wire to the token endpoint, in the injected header).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)
