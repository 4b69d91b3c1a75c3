"""Shared rate limits against a real redis-server, from several replicas' own pools."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from helpers.redis_server import RedisServer
from redis.asyncio import Redis

from skyproxy.cluster.backend import Bucket
from skyproxy.cluster.node import ClusterNode

Make = Callable[..., Any]


async def replicas(make_node: Make, server: RedisServer, count: int = 3) -> list[ClusterNode]:
    return [await make_node(server.url) for _ in range(count)]


async def test_a_per_user_limit_is_exact_across_three_replicas(
    redis_server: RedisServer, make_node: Make
) -> None:
    nodes = await replicas(make_node, redis_server)
    bucket = Bucket("dev", "predictions", "alice", 10, 60.0)
    decisions = await asyncio.gather(*(nodes[i % 3].rates.check([bucket]) for i in range(30)))
    allowed = [d for d in decisions if d.allowed]
    refused = [d for d in decisions if not d.allowed]
    assert len(allowed) == 10
    assert len(refused) == 20
    # A level just under 10 needs 6 s for one unit to drain at 10/min: Retry-After 6.
    assert {math.ceil(d.retry_after) for d in refused} == {6}
    assert all(d.refused_by == 0 for d in refused)
    # The headers' view: nothing left, and the bucket is empty a minute from now.
    assert {d.remaining(0, bucket) for d in refused} == {0}
    assert {d.reset(0, bucket) for d in refused} == {60}
    assert sorted(d.remaining(0, bucket) for d in allowed) == list(range(10))
    # Another user, and the same user on another environment, have buckets of their own.
    assert (await nodes[0].rates.check([Bucket("dev", "predictions", "bob", 10, 60.0)])).allowed
    assert (await nodes[1].rates.check([Bucket("prod", "predictions", "alice", 10, 60.0)])).allowed


async def test_user_ids_with_separators_do_not_share_a_bucket(
    redis_server: RedisServer, make_node: Make
) -> None:
    node = await make_node(redis_server.url)
    a = Bucket("dev", "r", "x:user:y", 1, 60.0)
    b = Bucket("dev", "r:user:x", "y", 1, 60.0)
    assert node.rates.key(a) != node.rates.key(b)
    assert (await node.rates.check([a])).allowed
    assert (await node.rates.check([b])).allowed
    assert not (await node.rates.check([a])).allowed


async def test_a_refusal_by_the_user_consumes_nothing_anywhere(
    redis_server: RedisServer, make_node: Make
) -> None:
    node = await make_node(redis_server.url)
    env = Bucket("dev", "predictions", None, 3, 3600.0)
    alice = Bucket("dev", "predictions", "alice", 1, 3600.0)
    bob = Bucket("dev", "predictions", "bob", 5, 3600.0)
    assert (await node.rates.check([alice, env])).allowed
    refused = await node.rates.check([alice, env])
    assert not refused.allowed
    assert refused.refused_by == 0
    # The environment took one unit, not two: bob gets the other two.
    assert (await node.rates.check([env, bob])).allowed
    assert (await node.rates.check([env, bob])).allowed
    last = await node.rates.check([env, bob])
    assert not last.allowed
    assert last.refused_by == 0  # the caller's order: the environment bucket came first
    assert math.ceil(last.retry_after) == 1200  # one unit of 3/hour drains in 20 minutes


async def test_the_environment_reserves_slots_up_to_max_wait_across_replicas(
    redis_server: RedisServer, make_node: Make
) -> None:
    nodes = await replicas(make_node, redis_server)
    # 2 per hour: a unit drains in 1800 s. max_wait 3600 s holds two reservations.
    env = Bucket("dev", "predictions", None, 2, 3600.0, max_wait=3600.0)
    decisions = [await nodes[i % 3].rates.check([env]) for i in range(5)]
    assert [d.allowed for d in decisions] == [True, True, True, True, False]
    delays = [d.delay for d in decisions[:4]]
    # Exact waits, less the few milliseconds that drained between the calls.
    for got, expected in zip(delays, [0, 0, 1800, 3600], strict=True):
        assert expected - 5 < got <= expected
    assert decisions[2].remaining(0, env) == 0
    # The fifth would wait 5400 s: refused, with Retry-After the wait beyond max_wait.
    assert 1795 < decisions[4].retry_after <= 1800
    assert decisions[4].refused_by == 0


async def test_a_refund_returns_a_waiting_requests_units(redis_server: RedisServer, make_node: Make) -> None:
    node = await make_node(redis_server.url)
    env = Bucket("dev", "predictions", None, 1, 3600.0, max_wait=3600.0)
    user = Bucket("dev", "predictions", "alice", 5, 3600.0)
    assert (await node.rates.check([env, user])).delay == 0
    waiting = await node.rates.check([env, user])
    assert waiting.allowed
    assert waiting.delay > 3590
    assert not (await node.rates.check([env, user])).allowed  # the slot is reserved
    await node.rates.refund([env, user])
    again = await node.rates.check([env, user])
    assert again.allowed
    assert again.delay > 3590
    # The user's bucket got its unit back too: three taken, one returned, so 5 - 2 free.
    assert again.remaining(1, user) == 3


async def test_several_rules_take_units_together_or_not_at_all(
    redis_server: RedisServer, make_node: Make
) -> None:
    node = await make_node(redis_server.url)
    tight = Bucket("dev", "burst", "alice", 1, 3600.0)
    loose = Bucket("dev", "daily", "alice", 100, 86400.0)
    first = await node.rates.check([loose, tight])
    assert first.allowed
    assert first.remaining(0, loose) == 99
    assert first.remaining(1, tight) == 0
    refused = await node.rates.check([loose, tight])
    assert refused.refused_by == 1
    assert (await node.rates.check([loose])).remaining(0, loose) == 98  # the refusal took nothing


async def test_no_buckets_is_allowed_without_a_call(redis_server: RedisServer, make_node: Make) -> None:
    node = await make_node(redis_server.url)
    redis_server.stop()
    assert (await node.rates.check([])).allowed
    assert node.connection.errors_total == 0


async def test_a_check_writes_the_buckets_that_key_names(redis_server: RedisServer, make_node: Make) -> None:
    node = await make_node(redis_server.url)
    observer = Redis.from_url(redis_server.url)
    try:
        buckets = [
            Bucket("dev", "r:1", None, 5, 60.0, max_wait=2.0),
            Bucket("dev", "r:1", "a:b%c", 5, 60.0),
            Bucket("dev", "r:1", "é", 5, 60.0),  # the same shape, another user
            Bucket("dev", "r:1", "a:b%c", 6, 60.0),  # another rate: a bucket of its own
        ]
        for _ in range(2):  # the second check is encoded from the kept pieces
            assert (await node.rates.check(buckets)).allowed
        written = {key.decode() for key in await observer.keys("test:rate:*")}
        assert written == {node.rates.key(b) for b in buckets}
        levels = [await observer.hget(node.rates.key(b), "l") for b in buckets]
        assert all(level is not None and 1.99 < float(level) <= 2.0 for level in levels), levels
    finally:
        await observer.aclose()
