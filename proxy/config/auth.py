"""The credential of an upstream (its ``auth`` section): one class per ``type``, each with its
cross-field rules in ``_check``."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal
from urllib.parse import urlsplit

from proxy.secret import Secret

from .fields import DURATION, key
from .values import SecretRef
from .walk import Checks

AuthType = Literal["royalti", "oauth2_password", "oauth2_client_credentials", "static", "none"]
AUTH_TYPES: tuple[AuthType, ...] = (
    "royalti",
    "oauth2_password",
    "oauth2_client_credentials",
    "static",
    "none",
)
_HTTP_URL = re.compile(r"^https?://[^/?#]+")
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # RFC 9110 §5.6.2: a header name


@dataclass(frozen=True, slots=True)
class RoyaltiAuth:
    """``type: royalti``: exactly one credential, email + password (the proxy logs in and renews
    on its own), refresh_token (handed in by an operator; it cannot be renewed once it
    expires), or a workspace/user API key (``RWAK...``/``RUAK...``, sent as is)."""

    email: Annotated[
        str | None, key("The account's email, to log in with.", env="ROYALTI_EMAIL")
    ] = None
    password: Annotated[
        Secret | None,
        key("The account's password.", env="ROYALTI_PASSWORD", env_file="ROYALTI_PASSWORD_FILE"),
    ] = None
    refresh_token: Annotated[
        SecretRef | None,
        key(
            "A refresh token handed in by an operator, instead of email + password.",
            env="ROYALTI_REFRESH_TOKEN",
            env_file="ROYALTI_REFRESH_TOKEN_FILE",
        ),
    ] = None
    api_key: Annotated[
        SecretRef | None,
        key(
            "A workspace or user API key, sent as is (no token exchange).",
            env="ROYALTI_API_KEY",
            env_file="ROYALTI_API_KEY_FILE",
        ),
    ] = None
    default_workspace: Annotated[
        str | None,
        key(
            "The workspace used when a request names none in workspace_header. Unset: every "
            "request must name one (400 WORKSPACE_REQUIRED otherwise).",
            env="ROYALTI_WORKSPACE",
        ),
    ] = None
    allowed_workspaces: Annotated[
        frozenset[str],
        key(
            "When not empty, the only workspaces a request may name (403 "
            "WORKSPACE_NOT_ALLOWED): a list, or one comma-separated string.",
            env="ROYALTI_ALLOWED_WORKSPACES",
        ),
    ] = frozenset()
    workspace_header: Annotated[
        str,
        key(
            "The request header that names the workspace; removed before forwarding.",
            env="ROYALTI_WORKSPACE_HEADER",
        ),
    ] = "X-Royalti-Workspace"
    user_id: Annotated[
        str | None,
        key(
            "Sent as userId to /auth/authtoken (tokens for another user; admin only).",
            env="ROYALTI_USER_ID",
        ),
    ] = None
    auth_url: Annotated[
        str | None,
        key(
            "Where /auth/login and /auth/authtoken live, when the upstream's url carries a base "
            "path they are not under.",
            default_doc="the upstream's url",
        ),
    ] = None

    @property
    def mode(self) -> Literal["login", "refresh_token", "api_key"]:
        if self.api_key is not None:
            return "api_key"
        if self.email is not None:
            return "login"
        return "refresh_token"

    def _check(self, c: Checks) -> RoyaltiAuth:
        on = (
            ("email", self.email),
            ("refresh_token", self.refresh_token),
            ("api_key", self.api_key),
        )
        modes = [m for m, value in on if value]
        if not modes:
            c.problem("email", "required when type is royalti (or refresh_token or api_key)")
        elif len(modes) > 1:
            c.problem(
                None,
                f"give one of email+password, refresh_token or api_key, not {' and '.join(modes)}",
            )
        # An unreadable password_file has been reported already; an empty one (an unset
        # ${VAR:-}) is no password at all.
        if self.email and self.password is None and not c.given("password_file"):
            c.problem("password", "required with email (or password_file)")
        if self.password is not None and not self.email:
            c.problem("email", "required with password")
        if not _TOKEN.fullmatch(self.workspace_header):
            c.problem("workspace_header", "is not a valid header name")
        auth_url = (self.auth_url or "").rstrip("/") or None
        if auth_url and not _HTTP_URL.match(auth_url):
            c.problem("auth_url", "must be an http:// or https:// URL")
        allowed = self.allowed_workspaces
        if self.default_workspace and allowed and self.default_workspace not in allowed:
            c.problem("default_workspace", "is not in allowed_workspaces")
        return dataclasses.replace(self, auth_url=auth_url)


# Form fields and headers the OAuth2 source writes itself (proxy.tokens.sources.oauth2), or that
# aiohttp owns: extra_params and extra_headers may not override them.
_OAUTH2_RESERVED_PARAMS = frozenset(
    {"grant_type", "username", "password", "refresh_token", "client_id", "client_secret", "scope"}
)
_OAUTH2_RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "host", "transfer-encoding"}
)
_PASSWORD_GRANT = {"grant": "password"}


@dataclass(frozen=True, slots=True)
class OAuth2Auth:
    """``type: oauth2_password`` or ``oauth2_client_credentials``: tokens from an OAuth2 token
    endpoint (RFC 6749 §4.3, §4.4)."""

    grant: Annotated[
        Literal["password", "client_credentials"],
        key("The grant, from the auth type (oauth2_<grant>).", derived=True),
    ]
    token_url: Annotated[str, key("The token endpoint (http or https).", required=True)]
    client_id: Annotated[str | None, key("The client's id.")] = None
    client_secret: Annotated[Secret | None, key("The client's secret.")] = None
    client_auth: Annotated[
        Literal["basic", "post", "none"],
        key(
            "How the client authenticates to the token endpoint: basic (HTTP Basic), post (in "
            "the form) or none.",
            default_doc="basic with a client_secret, else none",
        ),
    ] = "basic"
    username: Annotated[
        str | None, key("The resource owner's name (password grant).", only=_PASSWORD_GRANT)
    ] = None
    password: Annotated[
        Secret | None, key("The resource owner's password (password grant).", only=_PASSWORD_GRANT)
    ] = None
    scope: Annotated[str | None, key("The scope asked for, if any.")] = None
    extra_params: Annotated[
        Mapping[str, str], key("Extra form fields sent to the token endpoint.")
    ] = field(default_factory=dict)
    extra_headers: Annotated[
        Mapping[str, str], key("Extra headers sent to the token endpoint.")
    ] = field(default_factory=dict)
    default_lifetime: Annotated[
        float, DURATION, key("The token's lifetime when the endpoint sends no expires_in.")
    ] = 3600.0

    def _check(self, c: Checks) -> OAuth2Auth:
        auth = self
        if not c.given("client_auth"):
            # Without a client secret there is nothing to authenticate the client with.
            auth = dataclasses.replace(self, client_auth="basic" if self.client_secret else "none")
        if auth.token_url:
            for line in auth.problems():
                c.walk.problems.append(f"{c.where(None)}.{line}")
        return auth

    def problems(self) -> list[str]:
        """What makes these settings unable to work, one line per problem, each starting with
        its key below ``auth``. Checked here only: the source trusts the settings it is given."""
        problems: list[str] = []
        url = urlsplit(self.token_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            problems.append("token_url: must be an absolute http or https URL")
        client_auth = self.client_auth
        if client_auth in ("basic", "post") and not (self.client_id and self.client_secret):
            problems.append(f"client_auth: {client_auth!r} needs client_id and client_secret")
        if client_auth == "none" and self.client_secret:
            problems.append("client_secret: set, but client_auth is 'none'")
        if self.grant == "password" and not (self.username and self.password):
            problems.append("username, password: the password grant needs both")
        # RFC 6749 §4.4: only a confidential client may use the client-credentials grant.
        if self.grant == "client_credentials" and client_auth == "none":
            problems.append("client_auth: the client_credentials grant needs 'basic' or 'post'")
        for name in sorted(_OAUTH2_RESERVED_PARAMS.intersection(self.extra_params)):
            problems.append(f"extra_params.{name}: set by the source itself")
        for name in sorted(self.extra_headers):
            lower = name.lower()
            if lower in _OAUTH2_RESERVED_HEADERS or (
                lower == "authorization" and client_auth == "basic"
            ):
                problems.append(f"extra_headers.{name}: set by the source itself")
        if not self.default_lifetime > 0:
            problems.append("default_lifetime: must be positive")
        return problems


@dataclass(frozen=True, slots=True)
class StaticAuth:
    """``type: static``: one fixed token (an API key), read again when its file changes."""

    token: Annotated[SecretRef, key("The token.", required=True)]


@dataclass(frozen=True, slots=True)
class NoAuth:
    """``type: none``: no credential; the upstream is only routed to and streamed."""


Auth = RoyaltiAuth | OAuth2Auth | StaticAuth | NoAuth

AUTH_VARIANTS: dict[str, tuple[type, dict[str, str]]] = {
    "royalti": (RoyaltiAuth, {}),
    "oauth2_password": (OAuth2Auth, {"grant": "password"}),
    "oauth2_client_credentials": (OAuth2Auth, {"grant": "client_credentials"}),
    "static": (StaticAuth, {}),
    "none": (NoAuth, {}),
}
assert tuple(AUTH_VARIANTS) == AUTH_TYPES
