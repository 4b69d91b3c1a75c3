"""The aiolimiter adapter against a real `AsyncLimiter` on a fake `loop.time`.

Each test pins one assumption bucket.py makes about aiolimiter's private state, checked
against aiolimiter's own public behaviour (`has_capacity`, `acquire`), so an aiolimiter
release that changes what `_level` or `_last_check` mean fails here, by name.
"""

from __future__ import annotations

import asyncio

import pytest
from aiolimiter import AsyncLimiter
from helpers.clock import FakeClock, freeze_loop_clock

from skyproxy.proxy.bucket import (
    give_back,
    last_used,
    level,
    seconds_to_empty,
    seconds_to_fit,
    take_unit,
    units_free,
)


@pytest.fixture
async def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return freeze_loop_clock(monkeypatch)


async def ten_a_minute() -> AsyncLimiter:
    """10 units per 60 s: one unit drains every 6 s."""
    limiter = AsyncLimiter(10, 60)
    assert limiter.has_capacity()  # leaks to now, as every use does
    return limiter


async def settle() -> None:
    """Lets ready callbacks and due timers run; never waits on the (frozen) clock."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_the_private_fields_exist() -> None:
    limiter = AsyncLimiter(10, 60)
    assert isinstance(limiter._level, float), "aiolimiter no longer keeps a float _level"
    assert isinstance(limiter._last_check, float), "aiolimiter no longer keeps a float _last_check"


async def test_a_taken_unit_is_what_has_capacity_counts(clock: FakeClock) -> None:
    limiter = await ten_a_minute()
    assert [take_unit(limiter) for _ in range(4)] == [9, 8, 7, 6]
    assert level(limiter) == 4.0
    assert limiter.has_capacity(6)
    assert not limiter.has_capacity(6.001)


async def test_a_unit_taken_by_acquire_is_what_level_reads(clock: FakeClock) -> None:
    limiter = await ten_a_minute()
    for _ in range(3):
        await limiter.acquire()
    assert level(limiter) == 3.0
    assert units_free(limiter) == 7


async def test_the_level_leaks_at_max_rate_per_time_period(clock: FakeClock) -> None:
    limiter = await ten_a_minute()
    for _ in range(4):
        take_unit(limiter)
    assert seconds_to_empty(limiter) == 24
    clock.advance(6.0)
    assert limiter.has_capacity()
    assert level(limiter) == 3.0
    assert units_free(limiter) == 7
    assert seconds_to_empty(limiter) == 18
    clock.advance(100.0)
    assert limiter.has_capacity()
    assert level(limiter) == 0.0
    assert seconds_to_empty(limiter) == 0


async def test_seconds_to_fit_is_when_acquire_gets_its_unit(clock: FakeClock) -> None:
    limiter = await ten_a_minute()
    for _ in range(10):
        take_unit(limiter)
    clock.advance(1.5)
    wait = seconds_to_fit(limiter)
    assert wait == pytest.approx(4.5)
    waiter = asyncio.ensure_future(limiter.acquire())
    await settle()
    clock.advance(wait - 0.01)
    await settle()
    assert not waiter.done(), "acquire returned before seconds_to_fit said a unit fits"
    clock.advance(0.02)
    await settle()
    assert waiter.done(), "acquire still waits after seconds_to_fit said a unit fits"
    await waiter
    assert seconds_to_fit(limiter) > 0  # acquire took that unit


async def test_units_past_max_rate_are_reservations_that_drain_in_order(clock: FakeClock) -> None:
    limiter = await ten_a_minute()
    assert [take_unit(limiter) for _ in range(12)][-3:] == [0, -1, -2]
    assert units_free(limiter) == 0
    assert seconds_to_fit(limiter) == pytest.approx(18.0)  # 3 units over, 6 s each
    assert seconds_to_empty(limiter) == 72
    clock.advance(18.0)
    assert seconds_to_fit(limiter) == pytest.approx(0.0)
    assert limiter.has_capacity()


async def test_give_back_leaks_first_then_returns_one_unit(clock: FakeClock) -> None:
    limiter = await ten_a_minute()
    for _ in range(3):
        take_unit(limiter)
    clock.advance(6.0)  # one unit drains
    give_back(limiter)
    assert level(limiter) == 1.0
    assert limiter.has_capacity(9)
    assert not limiter.has_capacity(9.001)
    give_back(limiter)
    give_back(limiter)
    assert level(limiter) == 0.0  # never below empty


async def test_last_used_is_the_loop_time_of_the_last_leak(clock: FakeClock) -> None:
    limiter = await ten_a_minute()
    assert last_used(limiter) == clock.now
    start = clock.now
    clock.advance(100.0)
    assert last_used(limiter) == start  # looking at the clock is not a use
    await limiter.acquire()
    assert last_used(limiter) == clock.now
    clock.advance(5.0)
    seconds_to_fit(limiter)  # leaks, so it counts as a use
    assert last_used(limiter) == clock.now
