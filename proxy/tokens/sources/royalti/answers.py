"""Reading Royalti's token-endpoint answers: a JWT as a :class:`~proxy.tokens.token.Token`, a field
out of the JSON body."""

from __future__ import annotations

from typing import Any

from proxy.tokens.token import SkewNotice, Token, jwt_lifetime, make_token


def jwt_token(
    value: str,
    *,
    reference_time: float | None,
    requested_at: float,
    wall_requested_at: float,
    what: str,
    fresh: bool = True,
    skew: SkewNotice | None = None,
) -> Token:
    """A Royalti JWT as a :class:`Token`. ``reference_time`` is the answer's ``Date`` header
    for a ``fresh`` token, or our clock for a token handed in (see :func:`jwt_lifetime`)."""
    lifetime, _ = jwt_lifetime(
        value,
        server_time=reference_time,
        local_wall=wall_requested_at,
        fresh=fresh,
        skew=skew,
    )
    return make_token(
        value,
        lifetime=lifetime,
        requested_at=requested_at,
        wall_requested_at=wall_requested_at,
        what=what,
    )


def dig(body: Any, *path: str) -> Any:
    for name in path:
        if not isinstance(body, dict):
            return None
        body = body.get(name)
    return body
