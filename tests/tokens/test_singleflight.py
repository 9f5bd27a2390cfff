"""The single-flight helper the token manager and the Royalti login share."""

from __future__ import annotations

import asyncio

import pytest

from proxy.tokens.singleflight import SingleFlight


class Call:
    """A call that runs until released, counting how often it was started."""

    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self) -> str:
        self.started += 1
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return f"result {self.started}"


async def settle() -> None:
    """Let the tasks just made run up to their first real wait (no time passes)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_joiners_share_one_call() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    call = Call()
    joiners = [asyncio.ensure_future(flights.join("k", call)) for _ in range(5)]
    await settle()
    assert flights.running("k") is not None
    call.release.set()
    assert await asyncio.gather(*joiners) == ["result 1"] * 5
    assert call.started == 1
    assert flights.running("k") is None


async def test_keys_fly_separately() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    a, b = Call(), Call()
    ja = asyncio.ensure_future(flights.join("a", a))
    jb = asyncio.ensure_future(flights.join("b", b))
    await settle()
    assert a.started == b.started == 1
    b.release.set()
    assert await jb == "result 1"
    assert flights.running("a") is not None
    a.release.set()
    assert await ja == "result 1"


async def test_a_cancelled_joiner_does_not_cancel_the_shared_call() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    call = Call()
    leaver = asyncio.ensure_future(flights.join("k", call))
    stayer = asyncio.ensure_future(flights.join("k", call))
    await settle()
    leaver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaver
    task = flights.running("k")
    assert task is not None and not task.cancelled()
    call.release.set()
    assert await stayer == "result 1"
    assert call.started == 1


async def test_a_failure_frees_the_key_and_is_retrieved_when_nobody_waits() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    call = Call()
    call.fail = RuntimeError("boom")
    leaver = asyncio.ensure_future(flights.join("k", call))
    await settle()
    task = flights.running("k")
    assert task is not None
    leaver.cancel()  # nobody awaits the failure: it must not be reported as unretrieved
    call.release.set()
    with pytest.raises(RuntimeError):
        await asyncio.shield(task)
    assert flights.running("k") is None
    call.fail = None
    assert await flights.join("k", call) == "result 2"


async def test_the_key_is_free_before_joiners_wake() -> None:
    # A joiner that reacts to a failure by asking again must start a new call, not get the
    # finished one back.
    flights: SingleFlight[str, str] = SingleFlight()
    call = Call()
    call.fail = RuntimeError("boom")
    call.release.set()
    seen: list[bool] = []

    async def retry_on_failure() -> str:
        try:
            return await flights.join("k", call)
        except RuntimeError:
            seen.append(flights.running("k") is None)
            call.fail = None
            return await flights.join("k", call)

    assert await retry_on_failure() == "result 2"
    assert seen == [True]


async def test_spawn_is_used_and_close_cancels_what_flies() -> None:
    spawned: list[asyncio.Task[str]] = []

    def spawn(coro: object) -> asyncio.Task[str]:
        task: asyncio.Task[str] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        spawned.append(task)
        return task

    flights: SingleFlight[str, str] = SingleFlight(spawn)
    call = Call()
    task = flights.start("k", call)
    assert flights.start("k", call) is task
    assert spawned == [task]
    await settle()
    await flights.close()
    assert task.cancelled()
    assert flights.running("k") is None
