"""The shared exchange deadlines: fire on time, move with progress, never on finished work, stay bounded."""

from __future__ import annotations

import asyncio

from skyproxy.proxy import deadlines as module
from skyproxy.proxy.deadlines import Deadlines, Phase


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


async def test_a_deadline_moved_on_by_progress_does_not_fire_until_progress_stops() -> None:
    shared = Deadlines()
    outcome: list[str] = []

    async def exchange() -> None:
        deadline = shared.arm(1.0, Phase.BODY)
        try:
            for _ in range(30):  # 1.5 s in all, well past the first second
                await asyncio.sleep(0.05)
                deadline.extend(1.0)
            outcome.append("flowed")
            await asyncio.sleep(30)  # silent from here: fires a second later
        except asyncio.CancelledError:
            assert deadline.fired and deadline.phase is Phase.BODY
            deadline.absorb()
            outcome.append("cut")
        finally:
            deadline.finish()

    await asyncio.wait_for(exchange(), 10)
    assert outcome == ["flowed", "cut"]
    await shared.close()


async def test_entering_a_shorter_phase_fires_on_the_new_time() -> None:
    shared = Deadlines()

    async def exchange() -> Phase:
        deadline = shared.arm(60, Phase.HEAD)
        deadline.enter(Phase.BODY, 0.1)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            deadline.absorb()
            return deadline.phase
        finally:
            deadline.finish()
        raise AssertionError("not cut")

    assert await asyncio.wait_for(exchange(), 10) is Phase.BODY
    assert len(shared._heap) <= 1  # the minute-long entry, stale, never cancels anything
    await shared.close()


async def test_a_stale_entry_never_cancels_twice() -> None:
    shared = Deadlines()
    cancels: list[int] = []

    async def exchange() -> None:
        deadline = shared.arm(0.2, Phase.UPLOAD)
        deadline.enter(Phase.HEAD, 0.1)  # earlier: a second entry, the first now stale
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            deadline.absorb()
            cancels.append(1)
        try:
            await asyncio.sleep(0.4)  # past the stale entry's time: still not cancelled again
        finally:
            deadline.finish()

    await asyncio.wait_for(exchange(), 10)
    assert cancels == [1]
    await shared.close()
