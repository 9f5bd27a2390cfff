"""Royalti's error envelope, as the fake answers it: ``{"success": false, "error": {"code",
"message", "details"}}`` with the status, and ``Retry-After`` when there is one."""

from __future__ import annotations

import math
from http import HTTPStatus

from aiohttp import hdrs, web


class Failure(Exception):
    """An error answered in Royalti's envelope."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def response(self) -> web.Response:
        headers = {}
        if self.retry_after is not None:
            headers[hdrs.RETRY_AFTER] = str(max(0, math.ceil(self.retry_after)))
        return web.json_response(
            {
                "success": False,
                "error": {"code": self.code, "message": self.message, "details": []},
            },
            status=self.status,
            headers=headers,
        )


def status_code(status: int) -> str:
    try:
        return HTTPStatus(status).name
    except ValueError:
        return "ERROR"


def injected(status: int, retry_after: float | None) -> Failure:
    return Failure(status, status_code(status), "Injected failure", retry_after=retry_after)


def unauthorized(message: str) -> Failure:
    return Failure(401, "UNAUTHORIZED", message)
