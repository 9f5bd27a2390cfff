"""A 1 GiB upload or download through the proxy, from a process of its own.

    python bench/transfer.py upload URL SIZE [HEADER: VALUE]     # multipart POST, one file part
    python bench/transfer.py download URL SIZE [HEADER: VALUE]   # GET, body counted, not kept

The upload body is generated 64 KiB at a time and sent with its exact Content-Length (what a
browser or ``curl -F`` does), so neither side ever holds it whole. Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator

import aiohttp

CHUNK = 64 * 1024
BOUNDARY = "benchboundary7MA4YWxkTrZu0gW"
TIMEOUT = aiohttp.ClientTimeout(total=300, sock_read=60)


def _multipart(size: int) -> tuple[bytes, bytes]:
    head = (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="file"; filename="statement.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()
    return head, f"\r\n--{BOUNDARY}--\r\n".encode()


async def _body(head: bytes, size: int, tail: bytes) -> AsyncIterator[bytes]:
    yield head
    block = (b"0123456789abcdef" * (CHUNK // 16))[:CHUNK]
    left = size
    while left > 0:
        n = min(CHUNK, left)
        yield block if n == CHUNK else block[:n]
        left -= n
    yield tail


async def upload(url: str, size: int, extra: dict[str, str]) -> dict[str, object]:
    head, tail = _multipart(size)
    headers = {
        **extra,
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(len(head) + size + len(tail)),
    }
    start = time.perf_counter()
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
        s.post(url, data=_body(head, size, tail), headers=headers) as r,
    ):
        text = await r.text()
        status = r.status
    seconds = time.perf_counter() - start
    files = json.loads(text).get("files", []) if status == 200 else []
    received = files[0]["size"] if files else None
    return {
        "status": status,
        "sent": size,
        "received": received,
        "ok": status == 200 and received == size,
        "seconds": round(seconds, 2),
        "mib_s": round(size / seconds / 2**20, 1),
    }


async def download(url: str, size: int, extra: dict[str, str]) -> dict[str, object]:
    start = time.perf_counter()
    got = 0
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT, auto_decompress=False) as s,
        s.get(url, headers=extra) as r,
    ):
        status = r.status
        async for chunk in r.content.iter_any():
            got += len(chunk)
    seconds = time.perf_counter() - start
    return {
        "status": status,
        "received": got,
        "ok": status == 200 and got == size,
        "seconds": round(seconds, 2),
        "mib_s": round(got / seconds / 2**20, 1),
    }


if __name__ == "__main__":
    mode, url, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    extra = {k: v for k, _, v in (h.partition(": ") for h in sys.argv[4:])}
    fn = upload if mode == "upload" else download
    print(json.dumps(asyncio.run(fn(url, size, extra))))
