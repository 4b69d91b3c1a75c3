"""Redis going away and coming back: on_error per call, one log line each way, bounded calls."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers.daemon import eventually
from helpers.redis_server import RedisServer

from skyproxy.cluster.backend import Bucket, BudgetScope, Slot
from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.cluster.node import ClusterNode

Make = Callable[..., Any]
BUCKET = Bucket("dev", "predictions", "alice", 100_000, 60.0)
SLOT = Slot("dev", "predictions", "alice", 1000)
SCOPE = BudgetScope("daily", "alice", "2026-06-01", 1000.0, time.time() + 3600)


def cluster_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "skyproxy.cluster"]


async def recover(node: ClusterNode, server: RedisServer) -> float:
    """Starts the server again; the seconds until the node is no longer degraded."""
    server.start()
    started = time.monotonic()
    await eventually(lambda: not node.degraded, "recovered without a restart", deadline_s=5)
    return time.monotonic() - started


async def test_closed_refuses_while_redis_is_down_then_recovers(
    redis_server: RedisServer, make_node: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    node = await make_node(redis_server.url, on_error="closed", timeout_ms=200)
    assert (await node.rates.check([BUCKET])).allowed
    held = await node.inflight.acquire([SLOT])
    reserved = await node.budgets.reserve([SCOPE], 0.5)
    assert not node.degraded
    assert node.connection.errors_total == 0

    redis_server.stop()
    for _ in range(10):
        with pytest.raises(ClusterUnavailable) as caught:
            await node.rates.check([BUCKET])
    assert f"redis://127.0.0.1:{redis_server.port}/0" in str(caught.value)
    with pytest.raises(ClusterUnavailable):
        await node.inflight.acquire([SLOT])
    with pytest.raises(ClusterUnavailable):
        await node.budgets.reserve([SCOPE], 0.5)
    with pytest.raises(ClusterUnavailable):
        await node.webhooks.enqueue("evt", b"x")
    # Finishing an exchange never raises; the failure is counted.
    await node.inflight.release(held.lease)
    assert reserved.reservation is not None
    assert not await node.budgets.settle(reserved.reservation, 0.1)

    assert node.degraded
    assert node.refuses
    assert node.connection.errors_total == 15
    status = node.status()
    assert status["degraded"] is True
    assert status["redis"] == f"redis://127.0.0.1:{redis_server.port}/0"
    assert status["errors_total"] == 15
    down = cluster_lines(caplog)
    assert len(down) == 1, [r.getMessage() for r in down]
    assert down[0].levelno == logging.ERROR
    assert "unavailable" in down[0].getMessage()
    assert "on_error=closed" in down[0].getMessage()

    assert await recover(node, redis_server) < 5
    assert (await node.rates.check([BUCKET])).allowed
    lines = cluster_lines(caplog)
    assert len(lines) == 2
    assert "is back" in lines[1].getMessage()
    assert "15 calls failed" in lines[1].getMessage()
    assert not node.refuses
    assert node.connection.outages_total == 1


async def test_open_serves_unchecked_while_redis_is_down(
    redis_server: RedisServer, make_node: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    node = await make_node(redis_server.url, on_error="open", timeout_ms=200)
    limited = Bucket("dev", "predictions", "alice", 1, 3600.0)
    assert (await node.rates.check([limited])).allowed
    assert not (await node.rates.check([limited])).allowed

    redis_server.stop()
    rate = await node.rates.check([limited])
    assert (rate.allowed, rate.unchecked) == (True, True)
    slot = await node.inflight.acquire([SLOT])
    assert (slot.allowed, slot.unchecked, slot.lease) == (True, True, None)
    await node.inflight.release(slot.lease)  # nothing held, nothing to do
    budget = await node.budgets.reserve([SCOPE], 0.5)
    assert (budget.admitted, budget.unchecked) == (True, True)
    # Webhooks never pretend: an event that was not stored must not be acknowledged.
    with pytest.raises(ClusterUnavailable):
        await node.webhooks.enqueue("evt", b"x")
    assert node.degraded
    assert not node.refuses  # /-/health stays 200 under "open"
    assert node.connection.errors_total == 4
    down = cluster_lines(caplog)
    assert len(down) == 1
    assert "serving without shared limits" in down[0].getMessage()

    assert await recover(node, redis_server) < 5
    # Redis came back empty (no persistence): the limit applies afresh, checked again.
    after = await node.rates.check([limited])
    assert (after.allowed, after.unchecked) == (True, False)
    assert not (await node.rates.check([limited])).allowed
    assert len(cluster_lines(caplog)) == 2


async def test_an_outage_under_load_is_logged_once_and_every_call_ends_in_time(
    redis_server: RedisServer, make_node: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    timeout = 0.2
    node = await make_node(redis_server.url, on_error="closed", timeout_ms=timeout * 1000)
    outcomes: list[str] = []
    slowest = 0.0
    stop = asyncio.Event()

    async def client() -> None:
        nonlocal slowest
        while not stop.is_set():
            started = time.monotonic()
            try:
                await node.rates.check([BUCKET])
                outcomes.append("ok")
            except ClusterUnavailable:
                outcomes.append("refused")
            slowest = max(slowest, time.monotonic() - started)
            await asyncio.sleep(0.005)

    clients = [asyncio.create_task(client()) for _ in range(10)]
    await eventually(lambda: outcomes.count("ok") >= 50, "traffic before the outage")
    redis_server.stop()
    await eventually(lambda: outcomes.count("refused") >= 50, "refusals during the outage")
    await recover(node, redis_server)
    served = outcomes.count("ok")
    await eventually(lambda: outcomes.count("ok") >= served + 50, "traffic after the outage")
    stop.set()
    await asyncio.gather(*clients)

    assert slowest < timeout + 0.5
    lines = cluster_lines(caplog)
    assert [("unavailable" in r.getMessage(), "is back" in r.getMessage()) for r in lines] == [
        (True, False),
        (False, True),
    ]
    assert node.connection.errors_total == outcomes.count("refused")


async def test_a_paused_redis_costs_each_call_at_most_the_timeout(
    redis_server: RedisServer, make_node: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    timeout = 0.2
    node = await make_node(redis_server.url, on_error="closed", timeout_ms=timeout * 1000)
    nodes = [node, await make_node(redis_server.url, on_error="open", timeout_ms=timeout * 1000)]
    for each in nodes:
        assert (await each.rates.check([BUCKET])).allowed
    redis_server.pause()

    async def timed(call: Any) -> tuple[float, object]:
        started = time.monotonic()
        try:
            result: object = await call
        except ClusterUnavailable as exc:
            result = exc
        return time.monotonic() - started, result

    # Twenty calls at once on each replica: all were on the wire before any failed.
    results = await asyncio.gather(
        *(timed(each.rates.check([BUCKET])) for each in nodes for _ in range(20)),
        *(timed(node.budgets.reserve([SCOPE], 0.1)) for _ in range(5)),
    )
    assert max(seconds for seconds, _ in results) < timeout + 0.5
    assert max(seconds for seconds, _ in results) >= timeout * 0.9  # it did wait for Redis
    closed = [r for _, r in results[:20]]
    assert all(isinstance(r, ClusterUnavailable) for r in closed)
    assert "no answer within 200 ms" in str(closed[0])
    opened = [r for _, r in results[20:40]]
    assert all(getattr(r, "unchecked", False) for r in opened)
    # No call answered for twice the timeout after the late ones: the outage begins, and
    # later calls fail at once.
    assert all(n.degraded for n in nodes)  # slower than timeout_ms: degraded at once
    await eventually(lambda: all(n.connection.down for n in nodes), "an outage after the grace", deadline_s=5)
    seconds, result = await timed(node.rates.check([BUCKET]))
    assert isinstance(result, ClusterUnavailable)
    assert seconds < timeout
    assert len(cluster_lines(caplog)) == 2  # one line per replica

    redis_server.resume()
    started = time.monotonic()
    await eventually(lambda: not any(n.degraded for n in nodes), "recovered after SIGCONT", deadline_s=5)
    assert time.monotonic() - started < 5
    assert (await node.rates.check([BUCKET])).allowed


async def test_a_stall_shorter_than_the_grace_fails_only_the_calls_that_waited_through_it(
    redis_server: RedisServer, make_node: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """on_error applies per call: a Redis held up for one timeout costs the calls that
    waited past it, and the next call, answered, is served without waiting for a probe."""
    caplog.set_level(logging.DEBUG)
    timeout = 1.0  # the grace is twice this: room for a loaded machine between the two calls
    node = await make_node(redis_server.url, on_error="closed", timeout_ms=timeout * 1000)
    assert (await node.rates.check([BUCKET])).allowed
    redis_server.pause()
    with pytest.raises(ClusterUnavailable, match="no answer within 1000 ms"):
        await node.rates.check([BUCKET])
    redis_server.resume()
    assert (await node.rates.check([BUCKET])).allowed  # not refused as part of an outage
    assert not node.degraded and not node.refuses
    assert (node.connection.errors_total, node.connection.outages_total) == (1, 0)
    await asyncio.sleep(timeout * 3)  # past the grace: the answer ended the stall for good
    assert not node.degraded
    assert (await node.rates.check([BUCKET])).allowed
    lines = [r.getMessage() for r in cluster_lines(caplog)]
    assert len(lines) == 1, lines
    assert "answered again after 1 call got no answer within 1000 ms" in lines[0]
    assert "not an outage" in lines[0] and "unavailable" not in lines[0]
    assert node.status()["outages_total"] == 0


async def test_starting_while_redis_is_down_is_an_outage_not_a_crash(
    redis_server: RedisServer, make_node: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    redis_server.stop()
    node = await make_node(redis_server.url, on_error="closed", timeout_ms=200)
    assert node.degraded
    assert len(cluster_lines(caplog)) == 1
    assert await recover(node, redis_server) < 5
    assert (await node.rates.check([BUCKET])).allowed
