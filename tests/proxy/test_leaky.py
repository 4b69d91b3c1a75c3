"""leaky.py against aiolimiter's own `AsyncLimiter` on a fake `loop.time`, and its
generations of per-user buckets: dropped when drained, capped, invisible to the GC.

aiolimiter is only a test dependency: it is the reference the buckets must match,
through its public API (`has_capacity`, `acquire`).
"""

from __future__ import annotations

import asyncio
import gc
import random

import pytest
from aiolimiter import AsyncLimiter
from helpers.clock import FakeClock, freeze_loop_clock

from skyproxy.config import Rate
from skyproxy.proxy import leaky
from skyproxy.proxy.leaky import Bucket, UserBuckets

TEN_A_MINUTE = Rate(10, 60.0, "minute")  # one unit drains every 6 s


@pytest.fixture
async def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return freeze_loop_clock(monkeypatch)


def same_level(limiter: AsyncLimiter, level: float) -> bool:
    """Whether aiolimiter's level is `level`, asked through its public API only."""
    room = limiter.max_rate - level
    return limiter.has_capacity(room - 1e-9) and not limiter.has_capacity(room + 1e-9)


async def settle() -> None:
    """Lets ready callbacks and due timers run; never waits on the (frozen) clock."""
    for _ in range(10):
        await asyncio.sleep(0)


# -- the same answers as aiolimiter ------------------------------------------------------


@pytest.mark.parametrize(
    "rate",
    [TEN_A_MINUTE, Rate(3, 3600.0, "hour"), Rate(5, 1.0, "second"), Rate(1000, 60.0, "minute")],
)
async def test_user_buckets_answer_as_aiolimiter_does(clock: FakeClock, rate: Rate) -> None:
    rng = random.Random(f"{rate}")
    users = UserBuckets(rate, cap=None)
    reference = {name: AsyncLimiter(rate.count, rate.period) for name in ("alice", "bob", "carol")}
    unit = rate.period / rate.count  # seconds one unit takes to drain
    for _ in range(3000):
        clock.advance(rng.choice([0.0, rng.uniform(0, 2 * unit), rng.uniform(0, rate.period)]))
        name = rng.choice(list(reference))
        limiter = reference[name]
        level = users.leak(name, clock.now)
        assert users.fits(level) == limiter.has_capacity()
        if users.fits(level) and rng.random() < 0.8:
            await limiter.acquire()  # has room: returns at once, one unit taken
            level = users.take(name)
        assert same_level(limiter, level), f"{name} at {clock.now}: ours {level}"


async def test_an_environment_bucket_answers_as_aiolimiter_does(clock: FakeClock) -> None:
    rng = random.Random(7)
    bucket, limiter = Bucket(TEN_A_MINUTE), AsyncLimiter(10, 60.0)
    for _ in range(3000):
        clock.advance(rng.uniform(0, 12))
        level = bucket.leak(clock.now)
        assert bucket.fits(level) == limiter.has_capacity()
        if bucket.fits(level):
            await limiter.acquire()
            level = bucket.take()
        assert same_level(limiter, level)


async def test_seconds_to_fit_is_when_acquire_gets_its_unit(clock: FakeClock) -> None:
    bucket, limiter = Bucket(TEN_A_MINUTE), AsyncLimiter(10, 60.0)
    bucket.leak(clock.now)
    for _ in range(10):
        await limiter.acquire()
        bucket.take()
    clock.advance(1.5)
    wait = bucket.seconds_to_fit(bucket.leak(clock.now))
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


# -- what aiolimiter has no public word for ---------------------------------------------


async def test_units_past_max_rate_are_reservations_that_drain_in_order(clock: FakeClock) -> None:
    bucket = Bucket(TEN_A_MINUTE)
    bucket.leak(clock.now)
    assert [bucket.units_left(bucket.take()) for _ in range(12)][-3:] == [0, -1, -2]
    assert bucket.units_free(bucket.level) == 0
    assert bucket.seconds_to_fit(bucket.level) == pytest.approx(18.0)  # 3 units over, 6 s each
    assert bucket.seconds_to_empty(bucket.level) == 72
    clock.advance(18.0)
    assert bucket.seconds_to_fit(bucket.leak(clock.now)) == pytest.approx(0.0)
    assert bucket.fits(bucket.level)


async def test_give_back_leaks_first_then_returns_one_unit(clock: FakeClock) -> None:
    users = UserBuckets(TEN_A_MINUTE, cap=None)
    for _ in range(3):
        users.leak("alice", clock.now)
        users.take("alice")
    clock.advance(6.0)  # one unit drains
    users.give_back("alice", clock.now)
    assert users.level("alice", clock.now) == 1.0
    users.give_back("alice", clock.now)
    users.give_back("alice", clock.now)
    assert users.level("alice", clock.now) == 0.0  # never below empty
    users.give_back("nobody", clock.now)  # a dropped bucket: nothing to return
    assert len(users) == 1


async def test_levels_headers_read_from(clock: FakeClock) -> None:
    users = UserBuckets(TEN_A_MINUTE, cap=None)
    users.leak("alice", clock.now)
    levels = [users.take("alice") for _ in range(4)]
    assert [users.units_left(level) for level in levels] == [9, 8, 7, 6]
    assert users.seconds_to_empty(levels[-1]) == 24
    clock.advance(6.0)
    level = users.leak("alice", clock.now)
    assert level == 3.0
    assert users.units_free(level) == 7
    assert users.seconds_to_empty(level) == 18


# -- generations: drained buckets go, live ones stay ---------------------------------------


async def test_a_bucket_is_dropped_after_one_to_one_and_a_half_idle_periods(clock: FakeClock) -> None:
    users = UserBuckets(TEN_A_MINUTE, cap=None)
    users.leak("alice", clock.now)
    clock.advance(59.9)
    assert users.evict(clock.now) == 0
    clock.advance(0.1)
    assert users.evict(clock.now) == 1

    users.leak("bob", clock.now)
    clock.advance(29.0)
    users.leak("carol", clock.now)  # the same generation as bob
    clock.advance(31.0)  # bob idle a period, carol not yet: both stay
    assert users.evict(clock.now) == 0
    clock.advance(29.0)
    assert users.evict(clock.now) == 2
    assert len(users) == 0


async def test_a_used_bucket_moves_to_the_current_generation(clock: FakeClock) -> None:
    users = UserBuckets(TEN_A_MINUTE, cap=None)
    for name in ("alice", "bob"):
        users.leak(name, clock.now)
    clock.advance(45.0)
    users.leak("alice", clock.now)
    clock.advance(15.0)  # bob idle a period; alice used 15 s ago
    assert users.evict(clock.now) == 1
    assert "alice" in users
    assert "bob" not in users


async def test_new_users_drop_drained_buckets_two_at_a_time(clock: FakeClock) -> None:
    users = UserBuckets(Rate(10, 1.0, "second"), cap=None)
    for i in range(1000):
        users.leak(f"old-{i}", clock.now)
    clock.advance(1.0)
    for i in range(100):
        users.leak(f"new-{i}", clock.now)
    assert len(users) == 1000 - 200 + 100


async def test_the_cap_drops_the_least_recently_used_generation_first(clock: FakeClock) -> None:
    users = UserBuckets(TEN_A_MINUTE, cap=640)  # drops 10 at a time
    for i in range(640):
        users.leak(f"user-{i}", clock.now)
        if i == 319:
            clock.advance(30.0)  # the second half in the next generation
    users.leak("user-0", clock.now)  # used again: now among the most recent
    users.leak("new", clock.now)
    assert len(users) == 631
    assert users.level("user-0", clock.now) == 0.0
    assert "user-0" in users
    assert not any(f"user-{i}" in users for i in range(1, 11))
    assert "user-11" in users
    for i in range(10_000):  # a flood never takes it past the cap
        users.leak(f"flood-{i}", clock.now)
        assert len(users) <= 640
    assert "flood-9999" in users


async def test_generations_stay_small_and_every_bucket_is_found(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leaky, "_GENERATION_SIZE", 8)
    users = UserBuckets(TEN_A_MINUTE, cap=None)
    for i in range(100):  # all at one instant: only the size starts new generations
        users.leak(f"user-{i}", clock.now)
        users.take(f"user-{i}")
    assert len(users.generations) == 13
    assert all(len(generation.states) <= 8 for generation in users.generations)
    clock.advance(3.0)
    for i in range(100):  # each found wherever it is, half a unit drained, and moved
        assert users.leak(f"user-{i}", clock.now) == 0.5
    assert len(users) == 100


async def test_no_user_state_is_tracked_by_the_collector(clock: FakeClock) -> None:
    users = UserBuckets(TEN_A_MINUTE, cap=None)
    for i in range(1000):
        users.leak(f"user-{i}", clock.now)
        users.take(f"user-{i}")
        clock.advance(0.1)  # spans several generations
    assert len(users.generations) > 1
    for generation in users.generations:
        assert not gc.is_tracked(generation.states)
