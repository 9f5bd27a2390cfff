"""Royalti's three-tier credential chain (``../shared/UPSTREAMS.md``).

email + password --POST /auth/login--> refresh token (24 h JWT)
refresh token --GET /auth/authtoken?currentWorkspace=W--> access token for W (6 h JWT)

The refresh token is this source's own long-lived credential: one per upstream, obtained by at
most one login at a time, renewed by logging in again at about 80 % of its life, and replaced at
once (by one login, not a loop) when ``/auth/authtoken`` answers 401 because it was revoked.
A refresh token handed in by an operator cannot be renewed: as it nears expiry we say so loudly.
Login is rate limited (20 calls per 3 minutes per IP): failed logins back off, honour
``Retry-After``, and every workspace waiting on a login shares the one attempt. With a shared
token store (``credential``, see :mod:`proxy.tokens.shared`) every replica shares it too: a login
runs under the store's lease, and a refresh token another replica just obtained is adopted
instead of logging in again.

:mod:`~proxy.tokens.sources.royalti.source` asks for the access tokens,
:mod:`~proxy.tokens.sources.royalti.refresh` holds the refresh token, and
:mod:`~proxy.tokens.sources.royalti.answers` reads what both endpoints answer.
"""

from proxy.tokens.sources.royalti.source import RoyaltiSource

__all__ = ["RoyaltiSource"]
