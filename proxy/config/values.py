"""The value types and parsers the settings are made of: addresses, durations, sizes, secrets
given inline or as a file, ``${VAR}`` interpolation, Fernet keys."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.secret import Secret

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Address:
    """Where to listen: a host and port, or a Unix socket path."""

    host: str = "127.0.0.1"
    port: int = 8080
    unix: str | None = None

    @property
    def is_loopback(self) -> bool:
        if self.unix is not None:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SecretRef:
    """A secret given inline or as a file. ``load()`` reads the file again each call, so a
    credential that an operator rotates on disk is picked up."""

    value: Secret | None = None
    path: str | None = None

    def load(self) -> Secret:
        if self.value is not None:
            return self.value
        assert self.path is not None
        return read_secret_file(self.path)


@dataclass(frozen=True, slots=True)
class EncryptionKeys:
    """``token_store.encryption_key``: one or more Fernet keys (32 url-safe base64-encoded bytes
    each), separated by whitespace or commas. The first encrypts, all of them decrypt, so keys
    can be rotated without a flag day.

    Two are equal when given the same way (the same inline text or the same file), as before
    they were parsed: the keys read from the file are not compared.
    """

    source: SecretRef
    keys: tuple[Secret, ...] = field(compare=False)

    @classmethod
    def from_ref(cls, ref: SecretRef) -> EncryptionKeys:
        """Not parsed yet: ``TokenStoreConfig`` parses the keys when the store uses them."""
        return cls(ref, ())


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
    None: 1,
}
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

#: The string forms, for the JSON Schema (a ``${VAR}`` is accepted anywhere besides).
DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"
SIZE_PATTERN = r"^\s*\d+\s*([Bb]|[KkMmGg][Ii]?[Bb])?\s*$"
VARIABLE_PATTERN = r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}"


def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``1.5``, ``"30s"``, ``"5m"``, ``"6h"``, ``"250ms"``, ``"1d"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, 30s, 5m or 6h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError("expected a duration such as 30, 30s, 5m or 6h")


def parse_size(value: object) -> int:
    """Bytes from ``1048576``, ``"512KiB"``, ``"1MiB"``, ``"10MB"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576 or 1MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            return int(m.group(1)) * _SIZE_UNITS[unit]
    raise ValueError("expected a size such as 1048576 or 1MiB")


def parse_address(value: str) -> Address:
    """``host:port``, ``[v6]:port``, ``:port`` (all interfaces) or ``unix:/path``."""
    if value.startswith("unix:"):
        path = value[5:]
        if not path:
            raise ValueError("unix: needs a socket path")
        return Address(unix=path)
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit():
        raise ValueError("expected host:port, [ipv6]:port or unix:/path")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError("port out of range")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - an explicit ":port" asks for it
    return Address(host=host, port=port)


def to_address(value: object) -> Address:
    """:func:`parse_address` of a value's text (YAML may give ``:8080`` as a number)."""
    return parse_address(str(value))


def parse_network(value: str) -> IPNetwork:
    """An address or CIDR, host bits allowed (``10.1.2.3/8`` is ``10.0.0.0/8``)."""
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an address or network") from None


def parse_file_mode(value: object) -> int:
    """An octal file mode (``"0660"``)."""
    try:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError
        mode = int(str(value), 8)
        if not 0 <= mode <= 0o777:
            raise ValueError
    except ValueError:
        raise ValueError("must be an octal file mode such as 0660") from None
    return mode


def parse_4xx(value: str) -> int:
    """A 4xx status code."""
    if not value.isdigit() or not 400 <= int(value) <= 499:
        raise ValueError(f"{value!r} is not a 4xx status")
    return int(value)


def read_secret_file(path: str) -> Secret:
    """A secret from a file, without its trailing newline. Raises OSError if unreadable."""
    with open(path, encoding="utf-8") as fh:
        return Secret(fh.read().rstrip("\r\n"))


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; ``$$`` is a literal ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        raise KeyError(name)

    return _VAR.sub(sub, text)


def fernet_keys(text: str) -> tuple[Secret, ...]:
    """The Fernet keys in ``text``. Raises ValueError saying which one is wrong (never the key)."""
    # Imported here: only a redis token store encrypts, and only it needs cryptography.
    from cryptography.fernet import Fernet

    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if not parts:
        raise ValueError("is empty")
    for i, part in enumerate(parts):
        try:
            Fernet(part.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise ValueError(
                f"key {i + 1} is not a Fernet key (32 url-safe base64-encoded "
                "bytes; make one with `python -c 'from cryptography.fernet import "
                "Fernet; print(Fernet.generate_key().decode())'`)"
            ) from None
    return tuple(Secret(p) for p in parts)
