"""The connection's outage state at its edges: closing with calls in flight, a quiet replica's stall."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
from helpers.daemon import eventually
from helpers.redis_server import RedisServer

from skyproxy.cluster.backend import Bucket
from skyproxy.cluster.connection import RedisConnection
from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.cluster.rates import RedisRates
from skyproxy.cluster.url import RedisURL

Make = Callable[..., Any]
BUCKET = Bucket("dev", "predictions", "alice", 100_000, 60.0)


def cluster_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "skyproxy.cluster"]


async def test_calls_in_flight_when_the_connection_closes_start_no_outage_after_it(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Closing fails the calls still waiting on Redis; that is not Redis going away: no
    outage line, no probe left running, no connection opened again after close()."""
    caplog.set_level(logging.DEBUG)
    connection = RedisConnection(RedisURL(redis_server.url), on_error="closed", timeout_ms=500, prefix="t:")
    rates = RedisRates(connection)
    await connection.start()
    assert (await rates.check([BUCKET])).allowed
    redis_server.pause()
    try:
        waiting = [
            asyncio.ensure_future(rates.check([BUCKET])),  # on the script lane
            asyncio.ensure_future(connection.call(lambda redis: redis.get("t:x"))),  # on the pool
        ]
        await asyncio.sleep(0)  # both sent before close() starts
        await connection.close()
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(o, ClusterUnavailable) for o in outcomes), outcomes
        assert not connection.degraded
        assert connection.status()["outages_total"] == 0
        assert not [line for line in cluster_lines(caplog) if "unavailable" in line]
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not left, left
    finally:
        redis_server.resume()


async def test_a_stall_on_a_quiet_replica_is_not_an_outage(
    redis_server: RedisServer, make_node: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """One late call and no call after it (a replica with little traffic): no call was
    answered within the grace because none was made, not because Redis is away. The
    connection asks Redis before it calls an outage, and a Redis that answers ends the stall."""
    caplog.set_level(logging.DEBUG)
    node = await make_node(redis_server.url, on_error="closed", timeout_ms=500)
    assert (await node.rates.check([BUCKET])).allowed
    redis_server.pause()
    with pytest.raises(ClusterUnavailable, match="no answer within 500 ms"):
        await node.rates.check([BUCKET])
    redis_server.resume()
    await eventually(
        lambda: any("not an outage" in line for line in cluster_lines(caplog)),
        "the stall seen to end without a call",
        deadline_s=5,
    )
    assert not node.degraded
    assert node.status()["outages_total"] == 0
    lines = cluster_lines(caplog)
    assert len(lines) == 1, lines
    assert "answered again after 1 call got no answer within 500 ms" in lines[0]
