"""The shared whole-exchange deadline: fires on time, never on finished work, stays bounded."""

from __future__ import annotations

import asyncio

from skyproxy.proxy import deadlines as module
from skyproxy.proxy.deadlines import Deadlines


async def test_an_expired_deadline_cancels_its_task_and_says_so() -> None:
    shared = Deadlines()
    caught = asyncio.Event()

    async def exchange() -> str:
        deadline = shared.arm(0.05)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            assert deadline.fired
            deadline.absorb()
            caught.set()
            return "timed out"
        finally:
            deadline.finish()
        return "finished"

    task = asyncio.create_task(exchange())
    assert await asyncio.wait_for(task, 10) == "timed out"
    assert caught.is_set()
    if hasattr(task, "cancelling"):  # Python 3.11+: absorbed, so later timeouts still work
        assert task.cancelling() == 0
    await shared.close()


async def test_a_finished_exchange_is_never_cancelled() -> None:
    shared = Deadlines()

    async def exchange() -> None:
        deadline = shared.arm(0.01)
        deadline.finish()
        await asyncio.sleep(0.2)  # well past the deadline: must not be cancelled now

    await asyncio.wait_for(exchange(), 10)
    await shared.close()


async def test_a_cancellation_that_is_not_the_deadlines_is_not_marked_fired() -> None:
    shared = Deadlines()
    armed = asyncio.Event()
    seen: list[bool] = []

    async def exchange() -> None:
        deadline = shared.arm(30)
        armed.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append(deadline.fired)
            raise
        finally:
            deadline.finish()

    task = asyncio.create_task(exchange())
    await armed.wait()
    task.cancel()  # a shutdown, say
    await asyncio.gather(task, return_exceptions=True)
    assert seen == [False]
    await shared.close()


async def test_finished_entries_behind_a_long_one_are_compacted(monkeypatch) -> None:
    monkeypatch.setattr(module, "COMPACT_MIN", 10)
    shared = Deadlines()
    shared._compact_at = 10
    long = shared.arm(60)  # at the front of the heap for a minute
    for _ in range(100):
        shared.arm(120).finish()
    assert len(shared._heap) == 101
    await asyncio.sleep(module.RESOLUTION * 3)
    assert len(shared._heap) == 1  # only the long one is left
    long.finish()
    await shared.close()
