"""Webhook deduplication, routes and delivery claims shared by replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from helpers.daemon import eventually
from helpers.redis_server import RedisServer

Make = Callable[..., Any]


async def test_a_body_is_seen_first_by_exactly_one_replica(
    redis_server: RedisServer, make_node: Make
) -> None:
    nodes = [await make_node(redis_server.url) for _ in range(3)]
    firsts = await asyncio.gather(*(n.webhooks.first_seen("dev:route1:sha256", 60) for n in nodes * 4))
    assert sorted(firsts) == [False] * 11 + [True]
    key = "test:webhooks:seen:dev%3Aroute1%3Asha256"
    ttl = await nodes[0].connection.call(lambda redis: redis.pttl(key))
    assert 0 < ttl <= 60_000


async def test_a_route_written_by_one_replica_is_read_by_another(
    redis_server: RedisServer, make_node: Make
) -> None:
    a, b = await make_node(redis_server.url), await make_node(redis_server.url)
    await a.webhooks.put_route("r1", b'{"target": "http://127.0.0.1:9/hook"}', 3600)
    assert await b.webhooks.get_route("r1") == b'{"target": "http://127.0.0.1:9/hook"}'
    assert await b.webhooks.get_route("missing") is None


async def test_each_event_is_claimed_by_one_replica(redis_server: RedisServer, make_node: Make) -> None:
    nodes = [await make_node(redis_server.url) for _ in range(3)]
    for i in range(30):
        assert await nodes[i % 3].webhooks.enqueue(f"evt-{i}", f"payload-{i}".encode())
    assert not await nodes[0].webhooks.enqueue("evt-0", b"again")  # queued once
    assert await nodes[1].webhooks.depth() == 30
    claims = await asyncio.gather(*(n.webhooks.claim_due(7) for n in nodes * 3))
    claimed = [c.event_id for batch in claims for c in batch]
    assert sorted(claimed) == sorted(f"evt-{i}" for i in range(30))
    payloads = {c.event_id: c.payload for batch in claims for c in batch}
    assert payloads["evt-7"] == b"payload-7"
    # Every replica finishes what it claimed; nothing is left.
    for node, batch in zip(nodes * 3, claims, strict=True):
        for claim in batch:
            assert await node.webhooks.finish(claim.event_id)
    assert await nodes[2].webhooks.depth() == 0


async def test_a_claim_of_a_dead_replica_is_taken_over_after_its_lease(
    redis_server: RedisServer, make_node: Make
) -> None:
    dying = await make_node(redis_server.url, claim_lease_s=0.5)
    survivor = await make_node(redis_server.url, claim_lease_s=0.5)
    assert await dying.webhooks.enqueue("evt-1", b"body")
    assert [c.event_id for c in await dying.webhooks.claim_due(10)] == ["evt-1"]
    assert await survivor.webhooks.claim_due(10) == []  # held by the other replica
    started = time.monotonic()
    taken: list[str] = []

    async def take_over() -> bool:
        taken.extend(c.event_id for c in await survivor.webhooks.claim_due(10))
        return bool(taken)

    await eventually(take_over, "the claim taken over after its lease", deadline_s=5)
    assert taken == ["evt-1"]
    assert time.monotonic() - started >= 0.3
    # The replica that lost its claim can no longer finish or reschedule the event.
    assert not await dying.webhooks.finish("evt-1")
    assert not await dying.webhooks.reschedule("evt-1", 0)
    assert await survivor.webhooks.finish("evt-1")
    assert await survivor.webhooks.depth() == 0


async def test_renew_keeps_a_claim_and_reschedule_hands_it_back(
    redis_server: RedisServer, make_node: Make
) -> None:
    holder = await make_node(redis_server.url, claim_lease_s=0.6)
    other = await make_node(redis_server.url, claim_lease_s=0.6)
    assert await holder.webhooks.enqueue("evt-1", b"attempt 1")
    assert len(await holder.webhooks.claim_due(1)) == 1
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert await holder.webhooks.renew("evt-1")
        assert await other.webhooks.claim_due(1) == []
        await asyncio.sleep(0.1)
    # A failed attempt: due again after its delay, with the payload the relay updated.
    assert await holder.webhooks.reschedule("evt-1", 0.5, b"attempt 2")
    assert await other.webhooks.claim_due(1) == []
    assert not await holder.webhooks.renew("evt-1")  # given back: no longer held
    assert not await holder.webhooks.reschedule("evt-1", 0)
    assert await other.webhooks.enqueue("evt-2", b"later", delay_s=3600)
    claims: list[tuple[str, bytes]] = []

    async def retried() -> bool:
        claims.extend((c.event_id, c.payload) for c in await other.webhooks.claim_due(5))
        return bool(claims)

    await eventually(retried, "the rescheduled delivery due again", deadline_s=5)
    assert claims == [("evt-1", b"attempt 2")]


async def test_accept_deduplicates_and_queues_in_one_step(redis_server: RedisServer, make_node: Make) -> None:
    nodes = [await make_node(redis_server.url) for _ in range(3)]
    accepted = await asyncio.gather(
        *(n.webhooks.accept("dev:r1:sha", 60, f"msg_{i}", b"payload") for i, n in enumerate(nodes * 3))
    )
    assert sorted(accepted) == [False] * 8 + [True]
    winner = f"msg_{accepted.index(True)}"
    outlook = await nodes[0].webhooks.outlook()
    assert outlook.depth == 1
    assert outlook.next_due_in == 0
    assert outlook.oldest_age is not None and outlook.oldest_age < 5
    assert [c.event_id for c in await nodes[1].webhooks.claim_due(10)] == [winner]
    # Seen without a payload (a route that is gone): deduplicated, nothing queued.
    assert await nodes[2].webhooks.accept("dev:r2:sha", 60, "msg_x", None)
    assert not await nodes[2].webhooks.accept("dev:r2:sha", 60, "msg_y", None)
    assert (await nodes[2].webhooks.outlook()).depth == 1
    assert await nodes[1].webhooks.finish(winner)
    assert await nodes[0].webhooks.outlook() == type(outlook)(0, None, None)
