"""Shared in-flight caps: exact across replicas, and freed when a replica dies holding one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers.daemon import eventually
from helpers.redis_server import RedisServer
from helpers.slow_relay import SlowRelay

from skyproxy.cluster.backend import Slot
from skyproxy.cluster.errors import ClusterUnavailable

Make = Callable[..., Any]
SLOT = Slot("dev", "predictions", "alice", 2)


async def test_a_cap_of_two_holds_across_three_replicas(redis_server: RedisServer, make_node: Make) -> None:
    nodes = [await make_node(redis_server.url) for _ in range(3)]
    decisions = await asyncio.gather(*(nodes[i % 3].inflight.acquire([SLOT]) for i in range(12)))
    held = [d for d in decisions if d.allowed]
    assert len(held) == 2
    refused = [d for d in decisions if not d.allowed]
    assert {(d.refused_by, d.in_flight, d.lease) for d in refused} == {(0, 2, None)}
    # Releasing one frees exactly one place, whichever replica asks next.
    index = next(i for i, d in enumerate(decisions) if d.allowed)
    await nodes[index % 3].inflight.release(decisions[index].lease)
    again = await asyncio.gather(*(n.inflight.acquire([SLOT]) for n in nodes))
    assert sum(d.allowed for d in again) == 1
    # Other users are not affected.
    assert (await nodes[0].inflight.acquire([Slot("dev", "predictions", "bob", 2)])).allowed


async def test_several_caps_are_taken_together_or_not_at_all(
    redis_server: RedisServer, make_node: Make
) -> None:
    node = await make_node(redis_server.url)
    narrow = Slot("dev", "video", "alice", 1)
    wide = Slot("dev", "all", "alice", 5)
    first = await node.inflight.acquire([wide, narrow])
    assert first.allowed
    refused = await node.inflight.acquire([wide, narrow])
    assert not refused.allowed
    assert refused.refused_by == 1
    # The refusal took no place under the wide cap: four remain there.
    takes = [await node.inflight.acquire([wide]) for _ in range(5)]
    assert [d.allowed for d in takes] == [True, True, True, True, False]
    await node.inflight.release(first.lease)
    assert (await node.inflight.acquire([narrow])).allowed


async def test_a_dead_replicas_slot_frees_after_its_lease(redis_server: RedisServer, make_node: Make) -> None:
    dying = await make_node(redis_server.url, inflight_lease_s=0.5)
    survivor = await make_node(redis_server.url, inflight_lease_s=0.5)
    for _ in range(2):
        assert (await dying.inflight.acquire([SLOT])).allowed
    await dying.inflight.stop()  # no more renewals: the replica is gone, its leases stay in Redis
    assert not (await survivor.inflight.acquire([SLOT])).allowed
    started = time.monotonic()

    async def free() -> bool:
        return bool((await survivor.inflight.acquire([SLOT])).allowed)

    await eventually(free, "a slot freed by the lease running out", deadline_s=5)
    assert time.monotonic() - started >= 0.3  # not before the lease ran out


async def test_renewal_keeps_a_long_requests_slot(redis_server: RedisServer, make_node: Make) -> None:
    holder = await make_node(redis_server.url, inflight_lease_s=0.6)
    other = await make_node(redis_server.url, inflight_lease_s=0.6)
    leases = [await holder.inflight.acquire([SLOT]) for _ in range(2)]
    assert all(d.allowed for d in leases)
    # Held for several lease lengths while the renewer runs: the cap never opens.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert not (await other.inflight.acquire([SLOT])).allowed
        await asyncio.sleep(0.05)
    assert await holder.inflight.renew_all() == 2
    for decision in leases:
        await holder.inflight.release(decision.lease)
    assert holder.inflight.held == 0
    assert (await other.inflight.acquire([SLOT])).allowed


async def test_a_release_queued_without_waiting_frees_the_slot(
    redis_server: RedisServer, make_node: Make
) -> None:
    a, b = await make_node(redis_server.url), await make_node(redis_server.url)
    one = Slot("dev", "predictions", "carol", 1)
    held = await a.inflight.acquire([one])
    assert held.lease is not None
    assert not (await b.inflight.acquire([one])).allowed
    a.inflight.release_soon(held.lease)
    assert a.inflight.held == 0  # no longer renewed

    async def free() -> bool:
        decision = await b.inflight.acquire([one])
        return decision.allowed

    await eventually(free, "the slot released")


async def test_a_slot_taken_by_a_call_that_timed_out_is_given_back(
    redis_server: RedisServer, make_node: Make
) -> None:
    relay = SlowRelay(redis_server.port)
    await relay.start()
    try:
        node = await make_node(f"redis://127.0.0.1:{relay.port}/0", timeout_ms=200)
        one = Slot("dev", "predictions", "dave", 1)
        warm = await node.inflight.acquire([Slot("dev", "predictions", "erin", 1)])  # script loaded
        await node.inflight.release(warm.lease)
        relay.hold.set()  # the script runs on Redis; its answer comes too late
        with pytest.raises(ClusterUnavailable):
            await node.inflight.acquire([one])
        relay.hold.clear()
        await eventually(lambda: not node.degraded, "Redis back", deadline_s=5)

        # Well within the 10 s lease: the slot was released, not left to run out.
        await eventually(lambda: slot_free(node, one), "the slot free again", deadline_s=5)
    finally:
        await relay.stop()


async def test_a_release_waits_until_the_late_acquire_it_undoes_has_run(
    redis_server: RedisServer, make_node: Make
) -> None:
    """As for budget reservations: the release queued for an acquire that ran out of time
    waits until the lane answers again, so it cannot run before the acquire and leave the
    slot taken for the whole lease."""
    node = await make_node(redis_server.url, timeout_ms=200)
    one = Slot("dev", "predictions", "dave", 1)
    warm = await node.inflight.acquire([Slot("dev", "predictions", "erin", 1)])  # script loaded
    await node.inflight.release(warm.lease)
    redis_server.pause()
    with pytest.raises(ClusterUnavailable):
        await node.inflight.acquire([one])
    assert node.degraded
    await asyncio.sleep(0.6)  # three timeouts: a send of the release would have failed by now
    assert node.connection.errors_total == 1  # only the acquire: the release was not sent
    redis_server.resume()
    await eventually(lambda: not node.degraded, "Redis back", deadline_s=5)
    await eventually(lambda: slot_free(node, one), "the slot free, well within its 10 s lease", deadline_s=5)


async def slot_free(node: Any, slot: Slot) -> bool:
    """Whether `slot` can be taken now (it is given back at once)."""
    decision = await node.inflight.acquire([slot])
    if decision.lease is not None:
        await node.inflight.release(decision.lease)
    return bool(decision.allowed)
