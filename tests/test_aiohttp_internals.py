"""Every private aiohttp attribute and method the proxy relies on, in one list, checked against
the installed aiohttp. ``pyproject.toml`` pins aiohttp to the minor version this list was
verified with; an upgrade that removes or changes one of them fails here, naming it and its
fallback, before it changes what the proxy sends.

A name being present is not enough where the proxy *sets* it for aiohttp to read (the class
attributes): aiohttp's own code must still read it, so its code objects are searched for the
name. Where the proxy overrides or calls a method, its signature is compared too.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.client_proto import ResponseHandler

from proxy import readtimeout
from proxy.inbound import HANDLER_PRIVATE


@dataclass(frozen=True)
class Internal:
    owner: type
    name: str
    used_by: str
    fallback: str
    signature: tuple[str, ...] | None = None
    """Parameter names, for a method the proxy overrides or calls."""
    read_by_aiohttp: bool = False
    """The proxy sets it; some aiohttp method must still read it for that to mean anything."""


def _methods(cls: type) -> list[Callable[..., object]]:
    found = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("aiohttp"):
            for value in vars(klass).values():
                func = getattr(value, "fget", value)  # properties too
                if inspect.isfunction(func):
                    found.append(func)
    return found


def _read_by(cls: type, name: str) -> bool:
    return any(name in func.__code__.co_names for func in _methods(cls))


INTERNALS = (
    Internal(
        aiohttp.ClientRequest,
        "_skip_auto_headers",
        "sending.py ExactHeadersRequest.update_auto_headers",
        "pass skip_auto_headers= with each upstream request (public, about 7 % slower)",
        read_by_aiohttp=True,
    ),
    Internal(
        aiohttp.ClientRequest,
        "update_auto_headers",
        "sending.py ExactHeadersRequest (overridden: adds none of aiohttp's own headers)",
        "skip_auto_headers= with each request",
        signature=("self", "skip_auto_headers"),
    ),
    Internal(
        aiohttp.ClientRequest,
        "update_headers",
        "sending.py ExactHeadersRequest (overridden: one C-level extend)",
        "drop the override: aiohttp's own copies the headers one by one (slower, same result)",
        signature=("self", "headers"),
    ),
    Internal(
        web.StreamResponse,
        "_send_headers_immediately",
        "relaying.py _OneWriteResponse (head and first body bytes in one write)",
        "none needed: without it the head goes out in a write of its own (same bytes)",
        read_by_aiohttp=True,
    ),
    *(
        Internal(
            web.RequestHandler,
            name,
            "inbound.py _GuardedHandler._header_deadline",
            "GuardedServer warns at start-up and arms no header deadline; "
            "limits.idle_timeout still closes idle connections",
        )
        for name in HANDLER_PRIVATE
    ),
    Internal(
        web.RequestHandler,
        "handle_error",
        "inbound.py _GuardedHandler (overridden: the envelope on the HTTP layer's answers)",
        "none: aiohttp's plain-text answers (tests/test_http_errors.py fails too)",
        signature=("self", "request", "status", "exc", "message"),
    ),
    *(
        Internal(
            ResponseHandler,
            name,
            "readtimeout.py LazyReadTimeoutHandler (overridden or called)",
            "install() checks them and otherwise keeps aiohttp's own read timer (slower)",
            signature=("self",),
        )
        for name in ("_reschedule_timeout", "_drop_timeout", "_on_read_timeout")
    ),
    *(
        Internal(
            web.StreamResponse,
            name,
            "relaying.py _WrittenResponse (a response already written, built without __init__)",
            "none: _write_whole must return None, so that every response takes aiohttp's path",
            read_by_aiohttp=True,
        )
        for name in ("_status", "_keep_alive", "_eof_sent")
    ),
    Internal(
        aiohttp.ClientSession,
        "_retry_connection",
        "sending.py fresh_session (turned off: the proxy's own retry is one new connection)",
        "fresh_session's hasattr guard leaves aiohttp's retry on: an idempotent request may "
        "reach the upstream once more",
        read_by_aiohttp=True,
    ),
    Internal(
        aiohttp.BaseConnector,
        "_factory",
        "readtimeout.install (swaps the connector's protocol factory)",
        "install() returns False and the connector keeps aiohttp's protocol",
    ),
)


#: Set on instances only (no class default): looked for on a protocol that is never connected,
#: as readtimeout.install itself does.
INSTANCE_ONLY = tuple(
    name for name in readtimeout._USED if name in ("_read_timeout", "_read_timeout_handle", "_loop")
)


async def test_every_private_aiohttp_name_the_proxy_uses_is_there_and_unchanged() -> None:
    broken: list[str] = []
    for item in INTERNALS:
        where = f"{item.owner.__qualname__}.{item.name} ({item.used_by}; fallback: {item.fallback})"
        attr = getattr(item.owner, item.name, None)
        if attr is None and not _read_by(item.owner, item.name):
            broken.append(f"missing: {where}")
            continue
        if item.read_by_aiohttp and not _read_by(item.owner, item.name):
            broken.append(f"no longer read by aiohttp: {where}")
        if item.signature is not None:
            params = tuple(inspect.signature(attr).parameters) if callable(attr) else ()
            if params != item.signature:
                broken.append(f"signature {params} != {item.signature}: {where}")
    connector = aiohttp.TCPConnector()
    try:
        factory = connector._factory
        if not isinstance(factory, functools.partial) or factory.func is not ResponseHandler:
            broken.append(
                "BaseConnector._factory is not a partial of ResponseHandler (readtimeout)"
            )
        else:
            probe = factory()
            broken += [
                f"missing on ResponseHandler instances: {name} (readtimeout.py)"
                for name in INSTANCE_ONLY
                if not hasattr(probe, name)
            ]
        if not readtimeout.install(connector):
            broken.append("readtimeout.install() refused the connector: see its fallback")
    finally:
        await connector.close()
    # The methods the proxy overrides must still be the ones aiohttp calls.
    calls = {
        (aiohttp.ClientRequest, "__init__"): ("update_headers", "update_auto_headers"),
        (web.RequestHandler, "data_received"): HANDLER_PRIVATE,
    }
    for (owner, method), names in calls.items():
        code = getattr(owner, method).__code__
        broken += [
            f"{owner.__qualname__}.{method} no longer uses {n}"
            for n in names
            if n not in code.co_names
        ]
    # What aiohttp's server does with a handler's response, by attribute name: all of it must be
    # something relaying.py's _WrittenResponse answers (status, keep_alive and force_close from
    # the three fields it sets, prepare and write_eof overridden; headers and reason are read only
    # of an HTTPException). A new name means the server asks more of a response: review it.
    used = set()
    for method in ("start", "_handle_request", "finish_response"):
        used |= set(getattr(web.RequestHandler, method).__code__.co_names)
    asked = used & set(dir(web.StreamResponse))
    known = {"force_close", "headers", "keep_alive", "prepare", "reason", "status", "write_eof"}
    broken += [
        f"web.RequestHandler now uses StreamResponse.{n} (relaying.py)" for n in asked - known
    ]
    # GuardedServer passes web.Server's own keyword arguments through and keeps the rest for the
    # handlers it builds: the split must still be the one web.Server makes.
    server_params = inspect.signature(web.Server.__init__).parameters
    for name in ("request_factory", "handler_cancellation", "loop", "kwargs"):
        if name not in server_params:
            broken.append(f"web.Server.__init__ has no {name} (inbound.py GuardedServer)")
    assert not broken, "aiohttp internals the proxy uses changed:\n" + "\n".join(broken)


#: Every name ``ClientSession._request`` (with its nested functions) uses, as of aiohttp 3.14.5,
#: the version proxy/direct.py was written from. A name added by an aiohttp release is new
#: behaviour of ``session.request`` that the direct path may have to learn: review direct.py.
_REQUEST_NAMES_REVIEWED = frozenset(
    {
        "AUTHORIZATION",
        "BaseException",
        "CONTENT_LENGTH",
        "COOKIE",
        "ClientConnectorCertificateError",
        "ClientConnectorError",
        "ClientConnectorSSLError",
        "ClientError",
        "ClientOSError",
        "ClientPayloadError",
        "ClientRequest",
        "ClientResponse",
        "ClientTimeout",
        "ConnectionTimeoutError",
        "DeprecationWarning",
        "EMPTY_BODY_METHODS",
        "HTTP_AND_EMPTY_SCHEMA_SET",
        "IDEMPOTENT_METHODS",
        "InvalidURL",
        "InvalidUrlClientError",
        "InvalidUrlRedirectClientError",
        "JsonBytesPayload",
        "JsonPayload",
        "LOCATION",
        "LookupError",
        "METH_GET",
        "METH_HEAD",
        "METH_POST",
        "NonHttpUrlClientError",
        "NonHttpUrlRedirectClientError",
        "OSError",
        "PROXY_AUTHORIZATION",
        "RuntimeError",
        "ServerDisconnectedError",
        "TimeoutError",
        "TimeoutHandle",
        "TooManyRedirects",
        "Trace",
        "URI",
        "URL",
        "ValueError",
        "_UnlimitedCookieJar",
        "_attempt_started",
        "_auto_decompress",
        "_base_url",
        "_base_url_origin",
        "_bind",
        "_body",
        "_build_url",
        "_connector",
        "_cookie_jar",
        "_default_auth",
        "_default_proxy",
        "_default_proxy_auth",
        "_finalize",
        "_get_netrc_auth",
        "_has_no_authority",
        "_history",
        "_json_serialize",
        "_json_serialize_bytes",
        "_loop",
        "_max_field_size",
        "_max_headers",
        "_max_line_size",
        "_merge_ssl_params",
        "_middlewares",
        "_prepare_headers",
        "_raise_for_status",
        "_raw_cookie_headers",
        "_read_bufsize",
        "_request_class",
        "_requote_redirect_url",
        "_response_class",
        "_retry_connection",
        "_skip_auto_headers",
        "_timeout",
        "_timeout_ceil_threshold",
        "_trace_configs",
        "_trust_env",
        "_upload_gen",
        "_upload_tracker",
        "_version",
        "add_callback",
        "allowed_protocol_schema_set",
        "append",
        "args",
        "asyncio",
        "bool",
        "build_client_middlewares",
        "callable",
        "cancel",
        "ceil_threshold",
        "close",
        "closed",
        "connect",
        "connection",
        "consumed",
        "errno",
        "filter_cookies",
        "frozenset",
        "get",
        "get_env_proxy_for_url",
        "hdrs",
        "headers",
        "host",
        "isinstance",
        "istr",
        "join",
        "load",
        "method",
        "origin",
        "payload",
        "pop",
        "popall",
        "protocol",
        "quote_cookie",
        "raise_for_status",
        "raw_host",
        "release",
        "request_info",
        "run_in_executor",
        "scheme",
        "send",
        "send_request_end",
        "send_request_exception",
        "send_request_redirect",
        "send_request_start",
        "sentinel",
        "set_response_params",
        "sock_read",
        "start",
        "status",
        "strip_auth_from_url",
        "suppress",
        "timer",
        "to_thread",
        "total",
        "trace_config_ctx",
        "treat_as_secure_origin",
        "trust_env",
        "tuple",
        "unsafe",
        "update_cookies",
        "update_cookies_from_headers",
        "update_query",
        "upper",
        "url",
        "warn",
        "warnings",
    }
)


def _all_names(code: types.CodeType) -> set[str]:
    found = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _all_names(const)
    return found


async def test_the_direct_path_matches_the_aiohttp_it_was_written_from() -> None:
    """proxy/direct.py re-does the part of ``ClientSession._request`` the proxy uses: what it
    calls must still take what it passes, and ``_request`` must do nothing new."""
    new = _all_names(aiohttp.ClientSession._request.__code__) - _REQUEST_NAMES_REVIEWED
    assert not new, f"ClientSession._request now uses {sorted(new)}: review proxy/direct.py"
    params = set(inspect.signature(ResponseHandler.set_response_params).parameters)
    assert params == {
        "self", "timer", "skip_payload", "read_until_eof", "auto_decompress", "read_timeout",
        "read_bufsize", "timeout_ceil_threshold", "max_line_size", "max_field_size",
        "max_headers",
    }  # fmt: skip
    init = set(inspect.signature(aiohttp.ClientRequest.__init__).parameters)
    passed = {"method", "url", "headers", "data", "version", "loop", "response_class", "timer"}
    assert passed | {"session"} <= init
    # The session attributes direct.py reads are all set by ClientSession.__init__.
    read = {
        "_connector", "_loop", "_response_class", "_version", "_auto_decompress",
        "_read_bufsize", "_max_line_size", "_max_field_size", "_max_headers",
        "_retry_connection", "_request_class", "_cookie_jar", "_default_proxy",
        "_trace_configs", "_middlewares", "_default_headers", "_default_auth", "_trust_env",
        "_raise_for_status", "_base_url",
    }  # fmt: skip
    missing = read - _all_names(aiohttp.ClientSession.__init__.__code__)
    assert not missing, f"ClientSession no longer sets {sorted(missing)}: review proxy/direct.py"
