"""Shared budgets: exact under parallel reservations from several replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers.daemon import eventually
from helpers.redis_server import RedisServer
from helpers.slow_relay import SlowRelay

from skyproxy.cluster.backend import BudgetScope
from skyproxy.cluster.errors import ClusterUnavailable

Make = Callable[..., Any]


def scope(limit: float = 1.0, subject: str = "alice", budget: str = "daily") -> BudgetScope:
    return BudgetScope(budget, subject, "2026-06-01", limit, time.time() + 3600)


async def test_twenty_parallel_creates_of_030_against_1_admit_exactly_three(
    redis_server: RedisServer, make_node: Make
) -> None:
    nodes = [await make_node(redis_server.url) for _ in range(3)]
    daily = scope()
    decisions = await asyncio.gather(*(nodes[i % 3].budgets.reserve([daily], 0.30) for i in range(20)))
    admitted = [d for d in decisions if d.admitted]
    assert len(admitted) == 3
    refused = [d for d in decisions if not d.admitted]
    assert {(d.refused_by, d.spent_usd, d.reserved_usd) for d in refused} == {(0, 0.0, 0.9)}
    usage = await nodes[0].budgets.usage(daily)
    assert (usage.spent_usd, usage.reserved_usd) == (0.0, 0.9)


async def test_settle_replaces_the_estimate_and_release_frees_it(
    redis_server: RedisServer, make_node: Make
) -> None:
    a, b = await make_node(redis_server.url), await make_node(redis_server.url)
    daily = scope()
    first = await a.budgets.reserve([daily], 0.30)
    second = await b.budgets.reserve([daily], 0.30)
    assert first.reservation is not None
    assert second.reservation is not None
    # The cost came in lower than the estimate: $0.10 spent, $0.30 still reserved.
    assert await b.budgets.settle(first.reservation, 0.10)
    assert (await a.budgets.usage(daily)).spent_usd == pytest.approx(0.10)
    assert await a.budgets.release(second.reservation)
    usage = await a.budgets.usage(daily)
    assert (usage.spent_usd, usage.reserved_usd) == (0.1, 0.0)
    # Settling twice does not count twice.
    assert not await a.budgets.settle(first.reservation, 0.10)
    assert (await a.budgets.usage(daily)).spent_usd == 0.1
    # Exactly up to the limit: 0.1 + 0.9 = 1.0 is not over it; a cent more is.
    assert (await a.budgets.reserve([daily], 0.90)).admitted
    refused = await a.budgets.reserve([daily], 0.01)
    assert not refused.admitted
    assert (refused.spent_usd, refused.reserved_usd) == (0.1, 0.9)


async def test_a_refusal_in_one_budget_reserves_nothing_in_the_others(
    redis_server: RedisServer, make_node: Make
) -> None:
    node = await make_node(redis_server.url)
    user = scope(limit=0.50)
    team = scope(limit=10.0, subject="dev", budget="team")
    assert (await node.budgets.reserve([team, user], 0.40)).admitted
    refused = await node.budgets.reserve([team, user], 0.40)
    assert refused.refused_by == 1
    assert (await node.budgets.usage(team)).reserved_usd == 0.4


async def test_add_corrects_spent_after_a_settle(redis_server: RedisServer, make_node: Make) -> None:
    node = await make_node(redis_server.url)
    daily = scope()
    decision = await node.budgets.reserve([daily], 0.30)
    assert decision.reservation is not None
    assert await node.budgets.settle(decision.reservation, 0.30)  # the create's estimate
    assert await node.budgets.add([daily], 0.45 - 0.30)  # the terminal cost, known later
    assert (await node.budgets.usage(daily)).spent_usd == 0.45


async def test_a_dead_replicas_reservation_counts_its_estimate_until_settled(
    redis_server: RedisServer, make_node: Make
) -> None:
    dying = await make_node(redis_server.url, budget_lease_s=0.3)
    survivor = await make_node(redis_server.url)
    daily = scope()
    decision = await dying.budgets.reserve([daily], 0.30)
    assert decision.reservation is not None

    async def converted() -> bool:
        usage = await survivor.budgets.usage(daily)
        return (usage.spent_usd, usage.reserved_usd) == (0.3, 0.0)

    await eventually(converted, "the expired reservation counted as spent", deadline_s=5)
    # A settle that arrives late still replaces the estimate by the cost.
    assert await survivor.budgets.settle(decision.reservation, 0.05)
    assert (await survivor.budgets.usage(daily)).spent_usd == 0.05


async def test_the_keys_expire_after_the_period(redis_server: RedisServer, make_node: Make) -> None:
    node = await make_node(redis_server.url)
    ends = time.time() + 600
    daily = BudgetScope("daily", "alice", "2026-06-01", 1.0, ends)
    assert (await node.budgets.reserve([daily], 0.30)).admitted
    for key in node.budgets.keys(daily)[:3]:
        ttl = await node.connection.call(lambda redis, key=key: redis.ttl(key))
        assert 600 <= ttl <= 600 + 61, key
    # A scope whose period already ended starts empty.
    old = BudgetScope("daily", "alice", "2026-05-31", 1.0, time.time() - 120)
    assert (await node.budgets.reserve([old], 0.30)).admitted
    old_keys = node.budgets.keys(old)
    assert await node.connection.call(lambda redis: redis.exists(*old_keys)) == 0


async def test_money_is_exact_in_cents(redis_server: RedisServer, make_node: Make) -> None:
    node = await make_node(redis_server.url)
    daily = scope()
    # Ten times 0.1 in floats is 0.9999999999999999; in micro-dollars it is exactly 1.
    admitted = [(await node.budgets.reserve([daily], 0.1)).admitted for _ in range(11)]
    assert admitted == [True] * 10 + [False]


async def test_queued_calls_reach_redis_in_the_order_they_were_queued(
    redis_server: RedisServer, make_node: Make
) -> None:
    node = await make_node(redis_server.url)
    daily = scope()
    decision = await node.budgets.reserve([daily], 0.30)
    assert decision.reservation is not None
    node.budgets.add_soon([daily], 0.25)  # a create's spend, from its audit line
    node.budgets.settle_soon(decision.reservation, 0.0)  # then its reservation released
    node.budgets.settle_soon(decision.reservation, 0.5)  # settled already: changes nothing

    async def landed() -> bool:
        usage = await node.budgets.usage(daily)
        return (usage.spent_usd, usage.reserved_usd) == (0.25, 0.0)

    await eventually(landed, "the spend in and the reservation gone")
    assert (await node.budgets.usage(daily)).spent_usd == 0.25


async def test_stopping_sends_what_is_queued_and_an_outage_drops_it_without_raising(
    redis_server: RedisServer, make_node: Make
) -> None:
    node = await make_node(redis_server.url)
    daily = scope()
    node.budgets.add_soon([daily], 0.10)
    await node.budgets.stop()
    assert (await node.budgets.usage(daily)).spent_usd == 0.1
    redis_server.stop()
    node.budgets.add_soon([daily], 0.10)
    await node.budgets.stop()
    assert node.connection.errors_total >= 1
    assert (node.status()["queued_calls"], node.status()["queued_calls_lost"]) == (0, 1)


async def test_a_final_cost_replaces_the_estimate_another_replica_counted(
    redis_server: RedisServer, make_node: Make
) -> None:
    a, b = await make_node(redis_server.url), await make_node(redis_server.url)
    daily, team = scope(), scope(limit=10.0, subject="dev", budget="team")
    until = time.time() + 3600
    a.budgets.prediction_soon("pred_1", False, [daily, team], 0.30, until)  # the create, on a
    await a.budgets.stop()
    assert (await b.budgets.usage(daily)).spent_usd == 0.3
    b.budgets.prediction_soon("pred_1", True, [daily], 0.10, until)  # its terminal line, on b
    b.budgets.prediction_soon("pred_1", False, [daily], 0.30, until)  # a late estimate: ignored
    await b.budgets.stop()
    assert (await b.budgets.usage(daily)).spent_usd == 0.1
    assert (await b.budgets.usage(team)).spent_usd == 0.0
    # A final that replaces a final counts once; a state key that is gone stays gone.
    gone = BudgetScope("daily", "alice", "2026-05-31", 1.0, time.time() + 3600)
    b.budgets.prediction_soon("pred_2", False, [gone], 0.30, until)
    await b.budgets.stop()
    await b.connection.call(lambda redis: redis.delete(*b.budgets.keys(gone)))
    b.budgets.prediction_soon("pred_2", True, [daily], 0.20, until)
    b.budgets.prediction_soon("pred_2", True, [daily], 0.25, until)
    await b.budgets.stop()
    assert (await b.budgets.usage(daily)).spent_usd == 0.35
    assert await b.connection.call(lambda redis: redis.exists(*b.budgets.keys(gone))) == 0


async def test_a_final_cost_without_a_user_counts_where_the_estimate_did(
    redis_server: RedisServer, make_node: Make
) -> None:
    node = await make_node(redis_server.url)
    alice, nobody = scope(), scope(subject="none")
    until = time.time() + 3600
    node.budgets.prediction_soon("pred_1", False, [alice], 0.30, until)
    node.budgets.prediction_soon("pred_1", True, [nobody], 0.10, until, where_estimated=True)
    # Without an estimate to follow, it counts where the line says.
    node.budgets.prediction_soon("pred_2", True, [nobody], 0.05, until, where_estimated=True)
    await node.budgets.stop()
    assert (await node.budgets.usage(alice)).spent_usd == 0.1
    assert (await node.budgets.usage(nobody)).spent_usd == 0.05


async def test_a_final_cost_without_a_user_that_comes_before_its_estimate_moves_there(
    redis_server: RedisServer, make_node: Make
) -> None:
    """A poll through another replica can be answered, and its terminal line counted,
    before the creating replica's queued estimate reaches Redis: the cost must still end
    up billed to the creator, once, and not to "no user"."""
    creator, poller = await make_node(redis_server.url), await make_node(redis_server.url)
    alice, nobody = scope(), scope(subject="none")
    until = time.time() + 3600
    poller.budgets.prediction_soon("pred_1", True, [nobody], 0.10, until, where_estimated=True)
    await poller.budgets.stop()
    assert (await poller.budgets.usage(nobody)).spent_usd == 0.1  # counted meanwhile
    creator.budgets.prediction_soon("pred_1", False, [alice], 0.30, until)
    creator.budgets.prediction_soon("pred_1", False, [alice], 0.30, until)  # a line written twice
    await creator.budgets.stop()
    assert (await creator.budgets.usage(alice)).spent_usd == 0.1
    assert (await creator.budgets.usage(nobody)).spent_usd == 0.0
    # A terminal line that names the user places it for good; a later estimate changes nothing.
    other = await make_node(redis_server.url)
    other.budgets.prediction_soon("pred_2", True, [nobody], 0.05, until, where_estimated=True)
    other.budgets.prediction_soon("pred_2", True, [alice], 0.07, until)
    other.budgets.prediction_soon("pred_2", False, [nobody], 0.30, until)
    await other.budgets.stop()
    assert (await other.budgets.usage(alice)).spent_usd == pytest.approx(0.17)
    assert (await other.budgets.usage(nobody)).spent_usd == 0.0


async def test_a_burst_larger_than_one_transaction_is_sent_whole_and_in_order(
    redis_server: RedisServer, make_node: Make
) -> None:
    node = await make_node(redis_server.url)
    daily = scope(limit=10_000.0)
    decisions = [await node.budgets.reserve([daily], 1.0) for _ in range(300)]
    for decision in decisions:
        assert decision.reservation is not None
        node.budgets.add_soon([daily], 1.0)
        node.budgets.settle_soon(decision.reservation, 0.0)
    await node.budgets.stop()
    usage = await node.budgets.usage(daily)
    assert (usage.spent_usd, usage.reserved_usd) == (300.0, 0.0)


async def test_calls_queued_while_redis_is_away_are_sent_once_it_is_back(
    redis_server: RedisServer, make_node: Make
) -> None:
    node = await make_node(redis_server.url)
    daily = scope()
    redis_server.stop()
    with pytest.raises(ClusterUnavailable):
        await node.budgets.usage(daily)  # the outage begins
    node.budgets.add_soon([daily], 0.30)  # a create served under on_error = "open"
    assert node.status()["queued_calls"] == 1
    redis_server.start()
    await eventually(lambda: not node.degraded, "the probe found Redis back", deadline_s=5)
    # Waiting for Redis, the queue made no calls to fail: the outage counted one error.
    assert node.connection.errors_total == 1

    async def landed() -> bool:
        return (await node.budgets.usage(daily)).spent_usd == 0.3

    await eventually(landed, "the spend sent once Redis answered again", deadline_s=5)
    # Redis may show the spend a moment before the batch has read its answer.
    await eventually(lambda: node.status()["queued_calls"] == 0, "the batch emptied")
    assert node.status()["queued_calls_lost"] == 0


async def test_a_reservation_taken_by_a_call_that_timed_out_is_released(
    redis_server: RedisServer, make_node: Make
) -> None:
    relay = SlowRelay(redis_server.port)
    await relay.start()
    try:
        node = await make_node(f"redis://127.0.0.1:{relay.port}/0", timeout_ms=200)
        daily = scope()
        assert (await node.budgets.reserve([scope(subject="erin")], 0.1)).admitted  # script loaded
        relay.hold.set()  # the script runs on Redis; its answer comes too late
        with pytest.raises(ClusterUnavailable):
            await node.budgets.reserve([daily], 0.30)
        relay.hold.clear()
        await eventually(lambda: not node.degraded, "Redis back", deadline_s=5)

        async def released() -> bool:
            usage = await node.budgets.usage(daily)
            return (usage.spent_usd, usage.reserved_usd) == (0.0, 0.0)

        await eventually(released, "nothing held for a create that was refused")
    finally:
        await relay.stop()


async def test_an_addition_sent_again_after_its_answer_came_too_late_counts_once(
    redis_server: RedisServer, make_node: Make
) -> None:
    """A queued batch whose answer comes after timeout_ms is sent again, though Redis ran
    it: a line's own cost must still be added once."""
    relay = SlowRelay(redis_server.port)
    await relay.start()
    try:
        node = await make_node(f"redis://127.0.0.1:{relay.port}/0", timeout_ms=200)
        daily = scope()
        assert await node.budgets.add([scope(subject="erin")], 0.01)  # the script is loaded
        # The transaction runs on Redis and its answer comes too late (redis-py's check
        # that the script is loaded, before it, is answered in time).
        relay.hold_only = b"QUEUED"
        relay.hold.set()
        node.budgets.add_soon([daily], 0.25)
        await eventually(lambda: node.connection.errors_total >= 1, "the first send ran out of time")
        relay.hold.clear()
        await eventually(lambda: node.status()["queued_calls"] == 0, "the batch sent again")
        assert (await node.budgets.usage(daily)).spent_usd == 0.25
        assert node.status()["queued_calls_lost"] == 0
    finally:
        await relay.stop()


async def test_a_release_waits_until_the_late_reserve_it_undoes_has_run(
    redis_server: RedisServer, make_node: Make
) -> None:
    """A reserve that ran out of time is still in Redis' queue on the lane's connection. The
    release queued for it goes out on another one, so it waits until the lane answers
    again: run first, it would find nothing, and the reserve would hold its estimate for
    the whole lease."""
    node = await make_node(redis_server.url, timeout_ms=200)
    daily = scope()
    assert (await node.budgets.reserve([scope(subject="erin")], 0.1)).admitted  # the script is loaded
    redis_server.pause()
    with pytest.raises(ClusterUnavailable):
        await node.budgets.reserve([daily], 0.30)
    assert node.degraded  # slower than timeout_ms is degraded, outage or not
    assert node.status()["queued_calls"] == 1
    await asyncio.sleep(0.6)  # three timeouts: a send of the release would have failed by now
    assert node.connection.errors_total == 1  # only the reserve: the release was not sent
    redis_server.resume()
    await eventually(lambda: node.status()["queued_calls"] == 0, "the release sent once the lane answered")

    async def released() -> bool:
        usage = await node.budgets.usage(daily)
        return (usage.spent_usd, usage.reserved_usd) == (0.0, 0.0)

    await eventually(released, "nothing held for the create that was refused")
