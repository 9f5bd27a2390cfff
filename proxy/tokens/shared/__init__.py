"""Tokens and refresh credentials shared by every replica through a store (``token_store``).

Without a store, each replica logs in and renews on its own (:data:`LOCAL`). With one, for each
shared item (an access token for one upstream and workspace, or the refresh credential behind
them):

* a replica that needs a token reads the store first, and adopts the token there if it is not
  the one it last handed out and still has more than a quarter of its life left;
* otherwise it takes the item's lease, reads again (another replica may just have renewed it),
  and only then calls the token endpoint; it writes the result *fenced* (only while the lease is
  still its own, and over the version it read under it) and gives the lease up;
* a replica that finds the lease taken waits for the holder's result, polling the store, rather
  than calling the endpoint itself; if the holder failed, the waiters get its error, so that a
  login answered with 429 is not tried again by every replica in turn (oauth2-proxy's lock lets
  waiters through to redeem the same refresh token: its issues #1580 and #3456);
* when the store does not answer within its timeout, the replica renews locally exactly as it
  would without a store, and uses the store again once it answers.

Sources with a long-lived credential (Royalti's refresh token, an OAuth2 rotating refresh token)
keep it through the :class:`CredentialStore` they are constructed with: the renewal of
the credential runs under its own lease, and a rotating refresh token is marked spent in the
store (fenced) *before* it is sent, so that no replica can send it a second time, even one whose
lease expired in the middle of the call.
"""

from proxy.tokens.shared.credential import (
    LOCAL,
    CredentialHold,
    CredentialStore,
    LocalCredential,
    SharedCredential,
    Warmable,
)
from proxy.tokens.shared.lease import Shared
from proxy.tokens.shared.source import (
    OUTCOMES,
    SharedSource,
    account_of,
    share,
    shared_credential,
)

__all__ = [
    "LOCAL",
    "OUTCOMES",
    "CredentialHold",
    "CredentialStore",
    "LocalCredential",
    "Shared",
    "SharedCredential",
    "SharedSource",
    "Warmable",
    "account_of",
    "share",
    "shared_credential",
]
