"""The token value object and the rules that turn a token endpoint's answer into a lifetime."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import TokenFetchError

log = logging.getLogger("proxy.tokens")

# A token whose exp is decades away is almost certainly a bug on the issuer's side; we still
# renew it on a sane schedule.
MAX_LIFETIME = 7 * 24 * 3600.0
ONE_MINUTE = 60.0


def fingerprint(value: str) -> str:
    """The first 8 hex digits of the SHA-256 of ``value``: safe to log and show."""
    return hashlib.sha256(value.encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class Token:
    """A credential and when it stops being usable.

    Times are on the monotonic clock: ``obtained_at`` is when the request for the token was sent
    (counting from the request, not the response, absorbs the time the answer took to arrive),
    ``expires_at`` is ``obtained_at`` plus the lifetime the issuer granted minus a safety margin.
    ``wall_expires_at`` is the same instant on this machine's wall clock, for display only.

    ``expires`` is False for a credential that does not expire (a static token, a Royalti API
    key): its lifetime is then only how long the source wants it kept before it is looked at
    again (infinite for a value, the poll interval for a file), and /tokens and the metrics
    show it without an expiry instead of a made-up one.
    """

    value: str
    obtained_at: float
    lifetime: float
    wall_expires_at: float
    fingerprint: str = field(default="")
    expires_at: float = field(default=0.0)
    expires: bool = field(default=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", fingerprint(self.value))
        object.__setattr__(self, "expires_at", self.obtained_at + self.lifetime)

    def is_valid(self, now: float) -> bool:
        return now < self.expires_at

    def remaining(self, now: float) -> float:
        return self.expires_at - now

    def refresh_at(self, rng: random.Random | None = None) -> float:
        """When to renew this token ahead of its expiry.

        A jittered point at 75-85 % of the lifetime. When the lifetime allows it (two minutes or
        more, so that it still leaves half the lifetime) the point moves earlier to leave at least
        a minute before expiry. The margins scale with the lifetime, so a token that lives two
        seconds is renewed after about 1.6 s: not in a loop, and not discarded long before it
        expires.
        """
        fraction = (rng or random).uniform(0.75, 0.85)
        delay = self.lifetime * fraction
        if self.lifetime >= 2 * ONE_MINUTE:
            delay = min(delay, self.lifetime - ONE_MINUTE)
        return self.obtained_at + delay


def safety_margin(lifetime: float) -> float:
    """How much earlier than the issuer says we stop trusting a token.

    ``iat`` and ``exp`` are whole seconds, so a token may really expire up to a second before
    ``exp - iat`` says: keep one second, and a third of lifetimes shorter than three seconds.
    """
    return min(1.0, lifetime / 3)


def _segment(part: str) -> Any:
    """One base64url segment of a JWT (RFC 7515 §2: no padding), decoded as JSON."""
    raw = base64.b64decode(part + "=" * (-len(part) % 4), altchars=b"-_", validate=True)
    return json.loads(raw)


def _claims(value: str) -> dict[str, Any]:
    """A JWT's claims, read without verifying its signature: the proxy never verifies one (the
    upstream does), it only reads ``exp`` and ``iat`` to know when to renew. Decoded here with
    base64 and json instead of PyJWT, which imports ``cryptography`` when it is installed and
    would cost an idle proxy about 9 MiB and 0.1 s of start-up (docs/performance.md)."""
    parts = value.split(".")
    if len(parts) != 3:
        raise TokenFetchError("BAD_TOKEN", "token is not a decodable JWT")
    try:
        header = _segment(parts[0])
        claims = _segment(parts[1])
        base64.b64decode(parts[2] + "=" * (-len(parts[2]) % 4), altchars=b"-_", validate=True)
    except (ValueError, RecursionError) as exc:  # binascii.Error and JSON errors included
        raise TokenFetchError("BAD_TOKEN", "token is not a decodable JWT") from exc
    if not isinstance(header, dict):
        raise TokenFetchError("BAD_TOKEN", "token is not a decodable JWT")
    if not isinstance(claims, dict):
        raise TokenFetchError("BAD_TOKEN", "JWT payload is not an object")
    return claims


def _number(claims: dict[str, Any], name: str) -> float | None:
    v = claims.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


#: How far a ``Date`` header may stray from a fresh token's ``iat`` and still be believed.
DATE_TOLERANCE = 300.0


class SkewNotice:
    """Warns when a token issuer's clock and its ``Date`` header disagree: once per distinct
    skew, not once per token (a skewed front end skews every answer)."""

    __slots__ = ("_warned", "issuer")

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        """Who issues the tokens, for the log (an upstream name or a source kind, never a URL)."""
        self._warned: float | None = None

    def note(self, skew: float) -> None:
        """``skew`` is ``iat`` minus ``Date``: positive when the issuer's clock is ahead."""
        if self._warned is not None and abs(skew - self._warned) <= DATE_TOLERANCE:
            return
        self._warned = skew
        log.warning(
            "the token issuer's clock and its Date header disagree; "
            "token lifetimes are taken from exp - iat",
            extra={
                "event": "issuer_clock_skew",
                "issuer": self.issuer,
                "skew_seconds": round(skew),
            },
        )


def jwt_lifetime(
    value: str,
    *,
    server_time: float | None,
    local_wall: float,
    fresh: bool = True,
    skew: SkewNotice | None = None,
) -> tuple[float, float]:
    """``(lifetime, exp)`` of a JWT, read without verifying its signature.

    The lifetime is ``exp - iat``: the issuer's own clock on both sides, so a skew between our
    clock and the issuer's does not matter. ``server_time`` (the ``Date`` header of the answer
    that carried a ``fresh`` token, or our clock for a token handed in) can only shorten it:

    * a handed-in token (``fresh=False``) was issued some time ago: what is left is ``exp``
      minus ``server_time``, never more than ``exp - iat``;
    * a fresh token's ``Date`` is believed only when it agrees with ``iat`` within
      :data:`DATE_TOLERANCE` and half the lifetime (so it never takes more than half). A
      ``Date`` further off means the clock that stamps it (a front end, a CDN) is not the
      issuer's: ``exp - iat`` is trusted, ``skew`` warns once, and an upstream that really
      refuses the token still gets the 401 replay.

    Without ``iat`` we compare ``exp`` with ``server_time``, and only as a last resort with our
    own clock.
    """
    claims = _claims(value)
    exp = _number(claims, "exp")
    if exp is None:
        raise TokenFetchError("BAD_TOKEN", "JWT has no numeric exp claim")
    iat = _number(claims, "iat")
    if iat is not None and iat <= exp:
        lifetime = exp - iat
        if server_time is not None:
            if not fresh or abs(server_time - iat) <= min(DATE_TOLERANCE, lifetime / 2):
                lifetime = min(lifetime, exp - server_time)
            elif skew is not None:
                skew.note(iat - server_time)
    else:
        lifetime = exp - (server_time if server_time is not None else local_wall)
    return lifetime, exp


def make_token(
    value: str,
    *,
    lifetime: float,
    requested_at: float,
    wall_requested_at: float,
    what: str,
) -> Token:
    """Build a :class:`Token`, rejecting lifetimes that are already over and capping absurd ones."""
    if lifetime <= 0:
        raise TokenFetchError("TOKEN_EXPIRED", f"{what} is already expired when received")
    if lifetime > MAX_LIFETIME:
        log.warning(
            "token lifetime capped",
            extra={"event": "token_lifetime_capped", "what": what, "lifetime": lifetime},
        )
        lifetime = MAX_LIFETIME
    usable = lifetime - safety_margin(lifetime)
    return Token(
        value=value,
        obtained_at=requested_at,
        lifetime=usable,
        wall_expires_at=wall_requested_at + usable,
    )
