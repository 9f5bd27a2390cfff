"""The fake's API endpoints (everything but ``/auth/``) and the content they serve: lists, an echo
of what was received, multipart uploads, large deterministic CSV downloads, Server-Sent Events,
and any status code on demand. The fake's middleware has authorised each request before, and
read its body (``BODY``) unless it is an upload."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from collections.abc import Iterator
from typing import Any

from aiohttp import BodyPartReader, hdrs, web

from proxy.fakes.royalti_envelope import Failure, status_code

CHUNK_SIZE = 64 * 1024
DEFAULT_DOWNLOAD_SIZE = 1024 * 1024

WORKSPACE: web.RequestKey[str] = web.RequestKey("workspace", str)
"""The workspace the request's credential acts in."""
BODY: web.RequestKey[tuple[int, str]] = web.RequestKey("body", tuple)
"""The request body's length and SHA-256."""


def int_param(
    request: web.Request, name: str, default: int, *, low: int, high: int | None = None
) -> int:
    """Query parameter ``name`` as an integer from ``low`` to ``high``, else a 400 failure."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Failure(400, "VALIDATION_ERROR", f"{name} must be an integer") from None
    if value < low or (high is not None and value > high):
        raise Failure(400, "VALIDATION_ERROR", f"{name} is out of range")
    return value


_DSPS = ("Spotify", "Apple Music", "YouTube", "Deezer", "Tidal")
_COUNTRIES = ("NG", "US", "GB", "DE", "BR", "IN", "ZA")
_CSV_HEADER = b"row,isrc,title,artist,dsp,country,period,units,revenue\n"


# Everything after the title repeats with period 420 (= lcm of 5 DSPs, 7 countries, 12 months),
# so it is formatted once; a row then costs three integer conversions.
_CSV_TAILS = tuple(
    f"Artist {i % 97},{_DSPS[i % 5]},{_COUNTRIES[i % 7]},2024-{i % 12 + 1:02d},"
    f"{i * 37 % 1000},{i * 7919 % 100000 / 100:.2f}\n"
    for i in range(420)
)
_CSV_BATCH = 1024


def _csv_lines() -> Iterator[bytes]:
    """The CSV, forever, a batch of rows at a time."""
    yield _CSV_HEADER
    tails = _CSV_TAILS
    for first in itertools.count(1, _CSV_BATCH):
        yield "".join(
            [
                f"{i},QZFAK{i:07d},Track {i},{tails[i % 420]}"
                for i in range(first, first + _CSV_BATCH)
            ]
        ).encode()


def csv_bytes(size: int) -> Iterator[bytes]:
    """Yield exactly ``size`` bytes of deterministic CSV, in chunks of at most 64 KiB.

    A header line, then numbered royalty rows, cut off at ``size`` (mid-row if need be). This is
    exactly what the fake's download endpoints send, so tests can compute the expected digest.
    Memory stays bounded whatever ``size`` is.
    """
    if size < 0:
        raise ValueError("size must not be negative")
    lines = _csv_lines()
    buffer = bytearray()
    remaining = size
    while remaining > 0:
        want = min(CHUNK_SIZE, remaining)
        while len(buffer) < want:
            buffer += next(lines)
        yield bytes(buffer[:want])
        del buffer[:want]
        remaining -= want


async def drain(request: web.Request) -> tuple[int, str]:
    """Read the rest of the request body in chunks; its length and SHA-256, never all in memory."""
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_chunked(CHUNK_SIZE):
        digest.update(chunk)
        length += len(chunk)
    return length, digest.hexdigest()


async def list_page(request: web.Request) -> web.StreamResponse:
    page = int_param(request, "page", 1, low=1)
    size = int_param(request, "size", 10, low=1, high=100)
    kind = request.path.strip("/").replace("/", "-")
    first = (page - 1) * size + 1
    return web.json_response(
        {
            "success": True,
            "workspace": request[WORKSPACE],
            "page": page,
            "size": size,
            "data": [
                {"id": f"{kind}-{n}", "name": f"Fake {kind} {n}"}
                for n in range(first, first + min(size, 3))
            ],
        }
    )


async def echo(request: web.Request) -> web.StreamResponse:
    body_len, body_sha256 = request[BODY]
    return web.json_response(
        {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_len": body_len,
            "body_sha256": body_sha256,
            "workspace": request[WORKSPACE],
        }
    )


async def upload(request: web.Request) -> web.StreamResponse:
    if not request.content_type.startswith("multipart/"):
        raise Failure(400, "VALIDATION_ERROR", "Expected multipart/form-data")
    files: list[dict[str, Any]] = []
    reader = await request.multipart()
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            raise Failure(400, "VALIDATION_ERROR", "Nested multipart is not supported")
        digest = hashlib.sha256()
        size = 0
        while chunk := await part.read_chunk(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
        files.append(
            {
                "field": part.name,
                "filename": part.filename,
                "size": size,
                "sha256": digest.hexdigest(),
            }
        )
    return web.json_response({"success": True, "files": files})


async def download(request: web.Request) -> web.StreamResponse:
    size = int_param(request, "size", DEFAULT_DOWNLOAD_SIZE, low=0)
    response = web.StreamResponse(
        headers={hdrs.CONTENT_DISPOSITION: 'attachment; filename="export.csv"'}
    )
    response.content_type = "text/csv"
    response.content_length = size
    await response.prepare(request)
    for chunk in csv_bytes(size):
        await response.write(chunk)
    await response.write_eof()
    return response


async def chat(
    request: web.Request, *, gate: asyncio.Queue[None] | None, interval: float
) -> web.StreamResponse:
    """``n`` events, each after one item from ``gate`` when there is one, else ``interval``
    seconds apart, then a final ``done`` event."""
    count = int_param(request, "n", 5, low=0, high=10_000)
    response = web.StreamResponse(headers={hdrs.CACHE_CONTROL: "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    for index in range(count):
        # With a gate, each event waits for one item: tests prove events arrive one by one
        # without sleeping. The final "done" event is not gated.
        if gate is not None:
            await gate.get()
        elif index:
            await asyncio.sleep(interval)
        data = json.dumps({"index": index, "text": f"Royalty insight number {index}."})
        await response.write(f"id: {index}\ndata: {data}\n\n".encode())
    await response.write(b"event: done\ndata: {}\n\n")
    await response.write_eof()
    return response


async def status(request: web.Request) -> web.StreamResponse:
    try:
        status = int(request.match_info["code"])
    except ValueError:
        raise Failure(400, "VALIDATION_ERROR", "status must be an integer") from None
    if not 200 <= status <= 599:
        raise Failure(400, "VALIDATION_ERROR", "status is out of range")
    headers = {}
    if 300 <= status < 400:
        headers[hdrs.LOCATION] = "https://elsewhere.example/x"
    if status in (204, 304):
        return web.Response(status=status, headers=headers)
    if status >= 400:
        response = Failure(status, status_code(status), "Requested status").response()
        response.headers.update(headers)
        return response
    return web.json_response({"success": True, "status": status}, status=status, headers=headers)
