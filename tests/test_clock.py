"""The injectable clock: the fake one moves only when told to and wakes sleepers in deadline
order; the system one is the real time."""

from __future__ import annotations

import asyncio
import time

from proxy.clock import FakeClock, SystemClock, settle


async def test_a_fake_clock_stands_still_until_advanced_and_keeps_its_wall_offset() -> None:
    clock = FakeClock(start=10.0, wall_offset=100.0)
    assert (clock.monotonic(), clock.wall()) == (10.0, 110.0)
    await settle()
    assert clock.monotonic() == 10.0
    await clock.advance(2.5)
    assert (clock.monotonic(), clock.wall()) == (12.5, 112.5)


async def test_sleepers_wake_in_deadline_order_at_their_deadline_not_before() -> None:
    clock = FakeClock(start=0.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.monotonic()))

    tasks = [asyncio.ensure_future(sleeper(n, s)) for n, s in (("late", 3), ("early", 1))]
    await settle()
    assert clock.sleepers == 2
    await clock.advance(0.5)
    assert woke == []
    await clock.advance(5)
    assert woke == [("early", 1.0), ("late", 3.0)]
    assert clock.monotonic() == 5.5
    await asyncio.gather(*tasks)


async def test_advance_in_steps_lets_a_woken_task_schedule_its_next_sleep() -> None:
    clock = FakeClock(start=0.0)
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            await clock.sleep(1)
            ticks.append(clock.monotonic())

    task = asyncio.ensure_future(ticker())
    await clock.advance(3.5, step=1)
    assert ticks == [1.0, 2.0, 3.0]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert clock.sleepers == 0  # a cancelled wait no longer counts


async def test_a_sleep_of_zero_or_less_returns_without_an_advance() -> None:
    clock = FakeClock()
    await asyncio.wait_for(clock.sleep(0), 1)
    await asyncio.wait_for(clock.sleep(-1), 1)
    assert clock.sleepers == 0


async def test_the_system_clock_is_the_real_time() -> None:
    clock = SystemClock()
    assert abs(clock.monotonic() - time.monotonic()) < 1
    assert abs(clock.wall() - time.time()) < 1
    before = time.monotonic()
    await clock.sleep(-5)  # never a negative sleep
    assert time.monotonic() - before < 1
