"""The fake's JWTs: HS256 with a public test key, checked for their signature only (expiry is
judged on the fake's own clock), and the bearer credential they arrive in."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jwt
from aiohttp import hdrs, web

from proxy.fakes.royalti_envelope import unauthorized

ALGORITHM = "HS256"
REFRESH_NAME = "refresh_token"
"""The ``name`` claim of a refresh token (an access token's is the user's email)."""


def encode(claims: dict[str, Any], secret: str) -> str:
    with warnings.catch_warnings():
        # PyJWT warns about HMAC keys under 32 bytes; this key is a public test value, and
        # the test suite turns warnings into errors.
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return jwt.encode(claims, secret, algorithm=ALGORITHM)


def decode(token: str, secret: str) -> dict[str, Any]:
    """Check the signature only: expiry is judged on the fake's clock, not on real time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.InvalidTokenError:
            raise unauthorized("Invalid token") from None
    return claims


def expired(claims: Mapping[str, Any], now: float) -> bool:
    """No ``exp``, or ``exp`` reached at ``now`` (on the issuer's clock)."""
    exp = claims.get("exp")
    return not isinstance(exp, int | float) or now >= exp


def bearer(request: web.Request) -> str:
    """The request's bearer credential, or a 401 failure."""
    scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise unauthorized("Missing bearer token")
    return value.strip()
