"""The benchmark's own latency client (bench/loadgen.py interleave), against real servers: it
must take turns fairly, read each response whole however it is split, and count failures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import loadgen

BODY = b'{"data": [1, 2, 3]}'


Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serve_raw(answer: Answer) -> AsyncIterator[str]:
    """A keep-alive server on a loopback port that answers every request with ``answer``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await answer(writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/user/"


def _response(status: str, body: bytes) -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def _always(response: bytes) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(response)

    return answer


async def _split(writer: asyncio.StreamWriter) -> None:
    """Head and body in separate segments, the body itself in two."""
    head, body = _response("200 OK", BODY).split(b"\r\n\r\n", 1)
    for part in (head + b"\r\n\r\n", body[:5], body[5:]):
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(0)  # a turn of the loop between segments, not a wait for time


async def test_interleave_takes_turns_and_counts_failures_per_server() -> None:
    async with (
        serve_raw(_always(_response("200 OK", BODY))) as ok_url,
        serve_raw(_always(_response("503 Service Unavailable", b"no"))) as failing_url,
        serve_raw(_split) as split_url,
    ):
        result = await asyncio.to_thread(
            loadgen.interleave,
            [ok_url, failing_url, split_url],
            0.2,
            ["Accept: application/json"],
        )
    first, second, third = result["requests"]
    assert first == second == third > 0  # one each, in turn, whole rounds only
    assert result["errors"] == [0, first, 0]  # only the 503s count
    assert all(p50 > 0 for p50 in result["p50_us"])


def test_exchange_reads_a_response_split_across_reads_and_the_next_one_after_it() -> None:
    a, b = socket.socketpair()
    try:
        response = _response("200 OK", BODY)
        b.sendall(response[:10])
        b.sendall(response[10:])  # the rest, already there or not: the client must wait for it
        assert loadgen._exchange(a, b"GET / HTTP/1.1\r\n\r\n") == 200
        assert b.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
        b.sendall(_response("404 Not Found", b""))
        assert loadgen._exchange(a, b"GET / HTTP/1.1\r\n\r\n") == 404
    finally:
        a.close()
        b.close()


def test_exchange_reports_a_server_that_hangs_up() -> None:
    a, b = socket.socketpair()
    try:
        b.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        b.close()
        with pytest.raises(ConnectionError):
            loadgen._exchange(a, b"GET / HTTP/1.1\r\n\r\n")
    finally:
        a.close()


# -- footprint helpers (bench/goals_footprint.py, bench/harness.py) ------------------------------


def test_the_projects_dockerfile_has_a_slim_final_stage_without_build_tools() -> None:
    import goals_footprint

    assert goals_footprint._dockerfile_check(ROOT / "Dockerfile") == []


def test_a_final_stage_that_is_not_slim_or_installs_a_compiler_is_reported(tmp_path) -> None:
    import goals_footprint

    path = tmp_path / "Dockerfile"
    path.write_text(
        "FROM python:3.11-slim AS build\nRUN pip wheel .\n"
        "FROM python:3.11\nRUN apt-get update && apt-get install -y gcc\n"
    )
    problems = goals_footprint._dockerfile_check(path)
    assert len(problems) == 3
    assert "not slim" in problems[0]


def test_wakeups_sum_every_thread_of_a_process_and_grow_when_it_sleeps() -> None:
    import threading
    import time

    import harness

    slept, release = threading.Event(), threading.Event()

    def work() -> None:
        for _ in range(20):
            time.sleep(0.001)
        slept.set()
        release.wait(10)

    before = harness.wakeups(os.getpid())
    worker = threading.Thread(target=work)
    worker.start()
    try:
        assert slept.wait(10)
        # The worker slept 20 times: each a voluntary context switch of its own thread, which
        # the main thread's /proc/PID/status alone would not show.
        assert harness.wakeups(os.getpid()) - before >= 20
    finally:
        release.set()
        worker.join()


def test_the_table_prints_with_no_rows_and_aligns_the_rows_it_has() -> None:
    """``bench/run.py --only profile`` measures no goal: its table has a head and no rows."""
    import report

    empty = report.table([]).splitlines()
    assert empty[0].split() == ["goal", "target", "verdict", "measured"]
    rows = [report.Row("a long goal name", "<= 1", "x", "PASS"), report.Row("b", "-", "y", "INFO")]
    lines = report.table(rows).splitlines()
    assert len(lines) == 4
    assert lines[2].index("PASS") == lines[3].index("INFO")
