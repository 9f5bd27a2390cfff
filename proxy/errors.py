"""The proxy's exceptions and the JSON error envelope it answers with.

::

    ProxyError                     code, status: every error the proxy itself answers with
    ├── ConfigError                bad configuration (carries one line per problem)
    ├── InternalError              500 INTERNAL_ERROR: a request the proxy failed to handle (a bug)
    ├── RequestError               the client's request cannot be served as sent
    │   ├── MalformedRequest       400 MALFORMED_REQUEST (refused by the HTTP parser: oversized
    │   │                          headers, ambiguous framing, bad chunking, bad request line)
    │   ├── BadTarget              400 INVALID_REQUEST_TARGET (absolute-form, CONNECT, dot
    │   │                          segments, ...)
    │   ├── ExpectationFailed      417 EXPECTATION_FAILED (an Expect other than 100-continue)
    │   ├── ClientGone             499 CLIENT_CLOSED_REQUEST (nobody reads the answer)
    │   ├── ClientUnauthenticated  401 CLIENT_UNAUTHENTICATED (inbound shared secret)
    │   ├── ClientNotAllowed       403 CLIENT_NOT_ALLOWED (inbound.allowed_cidrs)
    │   ├── BodyTooLarge           413 BODY_TOO_LARGE
    │   ├── NoRoute                404 NO_ROUTE
    │   ├── WorkspaceRequired      400 WORKSPACE_REQUIRED
    │   ├── WorkspaceNotAllowed    403 WORKSPACE_NOT_ALLOWED
    │   └── UnknownWorkspace       404 UNKNOWN_WORKSPACE (Royalti does not know the client's
    │                              workspace, or it is not the user's; remembered a while)
    ├── TokenUnavailable           503 TOKEN_UNAVAILABLE (with retry_after)
    ├── Overloaded                 503 OVERLOADED (with retry_after)
    └── UpstreamError
        ├── UpstreamUnavailable    502 UPSTREAM_UNAVAILABLE
        │   └── EgressProxyError   502 UPSTREAM_UNAVAILABLE, details "cause: egress_proxy": the
        │                          egress proxy could not be reached or refused the request
        ├── UpstreamTLSError       502 UPSTREAM_TLS_ERROR
        └── UpstreamTimeout        504 UPSTREAM_TIMEOUT

    TokenFetchError                a token endpoint failed; never reaches a client directly: the
                                   token manager turns it into TokenUnavailable
    ├── CredentialRejected         the credential itself was refused (401, invalid_client): no
    │                              fast retry, it will not heal by itself
    │   └── WorkspaceRejected      authtoken answered 404 (or 400/422) for the workspace: a
    │                              configuration error for a default workspace, the client's
    │                              for any other
    └── RateLimited                429 from the token endpoint (with retry_after)

Messages never contain a secret: they are built from status codes, error codes and key names.
The envelope is Royalti's own, so a client handles one shape whoever produced the error.
"""

from __future__ import annotations

import json
from typing import ClassVar

ERROR_HEADER = "X-Royalti-Proxy-Error"


class ProxyError(Exception):
    """An error the proxy answers with itself."""

    code: ClassVar[str] = "PROXY_ERROR"
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []

    @property
    def retry_after(self) -> float | None:
        return None

    def body(self) -> bytes:
        """The error in Royalti's envelope."""
        return envelope(self.code, self.message, self.details)


def envelope(code: str, message: str, details: list[str] | None = None) -> bytes:
    return json.dumps(
        {"success": False, "error": {"code": code, "message": message, "details": details or []}}
    ).encode()


class ConfigError(ProxyError):
    code = "CONFIG_ERROR"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration", details=problems)
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join(self.problems)


class InternalError(ProxyError):
    code = "INTERNAL_ERROR"
    status = 500


class RequestError(ProxyError):
    status = 400


class MalformedRequest(RequestError):
    code = "MALFORMED_REQUEST"
    status = 400


class BadTarget(RequestError):
    code = "INVALID_REQUEST_TARGET"
    status = 400


class ExpectationFailed(RequestError):
    code = "EXPECTATION_FAILED"
    status = 417


class ClientGone(RequestError):
    code = "CLIENT_CLOSED_REQUEST"
    status = 499


class ClientUnauthenticated(RequestError):
    code = "CLIENT_UNAUTHENTICATED"
    status = 401


class ClientNotAllowed(RequestError):
    code = "CLIENT_NOT_ALLOWED"
    status = 403


class BodyTooLarge(RequestError):
    code = "BODY_TOO_LARGE"
    status = 413


class NoRoute(RequestError):
    code = "NO_ROUTE"
    status = 404


class WorkspaceRequired(RequestError):
    code = "WORKSPACE_REQUIRED"
    status = 400


class WorkspaceNotAllowed(RequestError):
    code = "WORKSPACE_NOT_ALLOWED"
    status = 403


class UnknownWorkspace(RequestError):
    code = "UNKNOWN_WORKSPACE"
    status = 404


class TokenUnavailable(ProxyError):
    code = "TOKEN_UNAVAILABLE"
    status = 503

    def __init__(self, message: str, *, retry_after: float, details: list[str] | None = None):
        super().__init__(message, details=details)
        self._retry_after = retry_after

    @property
    def retry_after(self) -> float:
        return self._retry_after


class Overloaded(ProxyError):
    code = "OVERLOADED"
    status = 503

    @property
    def retry_after(self) -> float:
        return 1.0


class UpstreamError(ProxyError):
    status = 502


class UpstreamUnavailable(UpstreamError):
    code = "UPSTREAM_UNAVAILABLE"
    status = 502


class EgressProxyError(UpstreamUnavailable):
    """The outbound (egress) HTTP proxy, not the upstream, failed: unreachable, or it refused
    the ``CONNECT`` or the request (407, 403, ...). Same code as any unreachable upstream, so a
    client handles one case; the details say which hop failed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, details=["cause: egress_proxy"])


class UpstreamTLSError(UpstreamError):
    code = "UPSTREAM_TLS_ERROR"
    status = 502


class UpstreamTimeout(UpstreamError):
    code = "UPSTREAM_TIMEOUT"
    status = 504


class TokenFetchError(Exception):
    """A token endpoint did not give a usable token.

    ``code`` is a short machine-readable reason (``HTTP_500``, ``BAD_RESPONSE``, ``invalid_grant``,
    ``NETWORK``, ``EGRESS_PROXY``, ...). ``retry_after`` is the server's ``Retry-After`` when it
    sent one.
    """

    def __init__(self, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


class CredentialRejected(TokenFetchError):
    """The configured credential was refused; retrying fast will not help."""


class WorkspaceRejected(CredentialRejected):
    """The token endpoint refused the workspace asked for (Royalti: 404, "unknown workspace",
    also what a workspace that is not the user's gets; or a validation error), not the
    credential."""


class RateLimited(TokenFetchError):
    """The token endpoint answered 429."""
