"""SharedWebhooks: the relay's queue and the receiver's receipts on the cluster's outbox."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from helpers.daemon import eventually
from helpers.redis_server import RedisServer

from skyproxy.webhooks.shared import SharedWebhooks
from skyproxy.webhooks.stats import WebhookStats
from skyproxy.webhooks.store import Route

Make = Callable[..., Any]


def route(route_id: str = "r" * 24, target: str = "http://127.0.0.1:9/hook") -> Route:
    return Route(route_id, "dev", target, ("completed",), "alice", "req-1", 1_700_000_000.5)


async def shared(make_node: Make, server: RedisServer, lease_s: float = 10.0) -> SharedWebhooks:
    node = await make_node(server.url, claim_lease_s=lease_s)
    return SharedWebhooks(node.webhooks, WebhookStats(), fails_open=False)


async def test_a_route_shared_by_one_replica_receives_on_another(
    redis_server: RedisServer, make_node: Make
) -> None:
    a, b = await shared(make_node, redis_server), await shared(make_node, redis_server)
    await a.share_route(route())
    first = await b.receive("dev", "r" * 24, b'{"id":"p1"}', "application/json", "p1", "completed", 0)
    again = await a.receive("dev", "r" * 24, b'{"id":"p1"}', "application/json", "p1", "completed", 0)
    assert (first.outcome, again.outcome) == ("stored", "duplicate")
    assert first.route == route()
    assert (
        await a.receive("prod", "r" * 24, b"{}", "application/json", None, None, 0)
    ).outcome == "unknown_route"
    assert (
        await a.receive("dev", "x" * 24, b"{}", "application/json", None, None, 0)
    ).outcome == "unknown_route"
    outbox = await a.due(time.time(), (), (), 10)
    assert [(d.event_id, d.body, d.attempts, d.origin) for d in outbox.due] == [
        (first.event_id, b'{"id":"p1"}', 0, "http://127.0.0.1:9")
    ]
    assert outbox.depth == 1


async def test_a_claim_is_renewed_while_its_attempt_runs(redis_server: RedisServer, make_node: Make) -> None:
    holder = await shared(make_node, redis_server, lease_s=0.6)
    other = await shared(make_node, redis_server, lease_s=0.6)
    await holder.share_route(route())
    await holder.receive("dev", "r" * 24, b"1", "application/json", None, None, 0)
    holder.start()
    try:
        (due,) = (await holder.due(time.time(), (), (), 10)).due
        deadline = time.monotonic() + 2.0  # several leases
        while time.monotonic() < deadline:
            assert (await other.due(time.time(), (), (), 10)).due == ()
            await asyncio.sleep(0.1)
    finally:
        await holder.stop()  # the replica dies: its claim is no longer renewed
    taken: list[str] = []

    async def take_over() -> bool:
        taken.extend(d.event_id for d in (await other.due(time.time(), (), (), 10)).due)
        return bool(taken)

    await eventually(take_over, "taken over once renewals stop", deadline_s=5)
    assert taken == [due.event_id]
    await other.delivered(due.event_id, 1)
    await holder.delivered(due.event_id, 1)  # too late: not its claim any more, nothing happens
    assert (await other.due(time.time(), (), (), 10)).depth == 0


async def test_one_delivery_per_origin_and_round_and_none_to_a_full_origin(
    redis_server: RedisServer, make_node: Make
) -> None:
    relay = await shared(make_node, redis_server)
    await relay.share_route(route("a" * 24, "http://127.0.0.1:1/hook"))
    await relay.share_route(route("b" * 24, "http://127.0.0.1:2/hook"))
    for n in range(3):
        await relay.receive("dev", "a" * 24, f"a{n}".encode(), "application/json", None, None, 0)
        await relay.receive("dev", "b" * 24, f"b{n}".encode(), "application/json", None, None, 0)
    first = await relay.due(time.time(), (), ("http://127.0.0.1:2",), 10)
    assert [d.origin for d in first.due] == ["http://127.0.0.1:1"]
    # The other deliveries to origin 1 were given back due now; origin 2's a second later.
    second = await relay.due(time.time(), (), (), 10)
    assert [d.origin for d in second.due] == ["http://127.0.0.1:1"]
    assert second.next_at is not None
    assert first.depth == second.depth == 6


async def test_a_retry_carries_its_attempts_and_a_gone_route_drops_the_rest(
    redis_server: RedisServer, make_node: Make
) -> None:
    stats = WebhookStats()
    relay = SharedWebhooks((await make_node(redis_server.url)).webhooks, stats, fails_open=False)
    other = await shared(make_node, redis_server)
    await relay.share_route(route())
    await relay.receive("dev", "r" * 24, b"1", "application/json", None, None, 0)
    (due,) = (await relay.due(time.time(), (), (), 10)).due
    await relay.retry(due.event_id, 1, time.time(), "HTTP 500")
    (again,) = (await other.due(time.time(), (), (), 10)).due
    assert (again.event_id, again.attempts) == (due.event_id, 1)
    await other.receive("dev", "r" * 24, b"2", "application/json", None, None, 0)
    # The app answered 410: the route is gone for every replica, the queued event dropped.
    assert await other.gone(due.route_id, due.event_id, 2, "HTTP 410", time.time()) == 1
    assert (await relay.due(time.time(), (), (), 10)).due == ()
    assert stats.gone == 1
    assert (await relay.due(time.time(), (), (), 10)).depth == 0
    late = await relay.receive("dev", "r" * 24, b"late", "application/json", None, None, 0)
    assert late.outcome == "stored"
    assert late.route is not None and late.route.gone
    assert (await relay.due(time.time(), (), (), 10)).depth == 0  # seen, never queued
