"""The suite's own check (tests/loop_exceptions.py): whatever reaches an event loop's exception
handler fails the test that caused it."""

from __future__ import annotations

import asyncio
import gc
import textwrap

from tests.conftest import ROOT


async def test_an_exception_in_a_callback_is_recorded_for_this_test(loop_exceptions):
    def callback() -> None:
        raise ValueError("from a callback")

    asyncio.get_running_loop().call_soon(callback)
    await asyncio.sleep(0)
    (record,) = loop_exceptions.take()  # taken: this test provokes it on purpose
    assert record["message"].startswith("Exception in callback")
    assert isinstance(record["exception"], ValueError)


async def test_a_task_whose_exception_nobody_retrieved_is_recorded(loop_exceptions):
    async def fails() -> None:
        raise KeyError("never awaited")

    task = asyncio.ensure_future(fails())
    await asyncio.sleep(0)
    assert task.done()
    del task
    gc.collect()
    (record,) = loop_exceptions.take()
    assert record["message"] == "Task exception was never retrieved"
    assert isinstance(record["exception"], KeyError)


def test_a_test_that_makes_its_loop_report_fails_and_its_neighbours_do_not(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeini("[pytest]\nasyncio_mode = auto\n")
    pytester.makeconftest('pytest_plugins = ("tests.loop_exceptions",)\n')
    pytester.makepyfile(
        test_inner=textwrap.dedent(
            """
            import asyncio

            async def test_callback_raises():
                def boom():
                    raise RuntimeError("boom")
                asyncio.get_running_loop().call_soon(boom)
                await asyncio.sleep(0)

            async def test_drops_a_failed_task():
                async def fails():
                    raise KeyError("lost")
                asyncio.ensure_future(fails())
                await asyncio.sleep(0)

            async def test_clean():
                await asyncio.sleep(0)

            def test_sync_clean():
                pass
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=2)
    out = result.stdout.str()
    assert "ERROR at teardown of test_callback_raises" in out
    assert "ERROR at teardown of test_drops_a_failed_task" in out
    assert "Exception in callback" in out and "RuntimeError: boom" in out
    assert "Task exception was never retrieved" in out and "KeyError: 'lost'" in out
    assert "teardown of test_clean" not in out
