"""The budget views of a replica when Redis does not answer: an honest error, or this
replica's own figures labelled as such; never a hang, never the Redis password."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from helpers import Daemon
from helpers.redis_server import RedisServer
from redis.asyncio import Redis

Replicas = Callable[..., list[Daemon]]
ALICE = {"X-User-Id": "alice"}
PASSWORD = "pw-canary-9b3e7d1a5c2f8e0b4d6a"
BUDGET = (
    '[pricing]\ntruefusion-pro = 0.3\n[[budgets]]\nname = "daily"\nper = "user"\nusd = 1.0\nperiod = "day"\n'
)


async def test_without_redis_budgets_is_a_503_and_the_bars_fall_back_to_this_replica(
    start_redis: Callable[..., RedisServer], start_replicas: Replicas
) -> None:
    server = start_redis(password=PASSWORD)
    (replica,) = start_replicas(server.url, count=1, rules=BUDGET)
    server.stop()
    texts: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.get(f"{replica.url}/-/budgets") as answer:
            texts.append(await answer.text())
            assert answer.status == 503
            assert (await answer.json())["error"]["code"] == "limits_unavailable"
        async with session.get(f"{replica.url}/-/api/spend") as answer:
            texts.append(await answer.text())
            assert answer.status == 200
            document: dict[str, Any] = await answer.json()
    assert document["budgets_source"] == "this replica (Redis did not answer)"
    assert document["budgets"] == []
    texts.append(replica.stderr())
    assert not any(PASSWORD in text or PASSWORD[-12:] in text for text in texts)


async def test_many_dashboards_and_budget_calls_share_one_read_of_redis(
    start_redis: Callable[..., RedisServer], start_replicas: Replicas
) -> None:
    """Each read SCANs the Redis that answers every replica's rate checks: open dashboards
    polling every 2 s and /-/budgets calls must share one read, not each make their own."""
    server = start_redis()
    (replica,) = start_replicas(server.url, count=1, rules=BUDGET)
    redis = Redis.from_url(server.url)

    async def scans() -> int:
        stats = await redis.info("commandstats")
        return int(stats.get("cmdstat_scan", {}).get("calls", 0))

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            create = {"model": "truefusion-pro", "input": {"prompt": "a cat"}}
            async with session.post(f"{replica.url}/v1/predictions", json=create, headers=ALICE) as r:
                assert r.status == 201

            async def view(path: str) -> dict[str, Any]:
                async with session.get(f"{replica.url}{path}") as answer:
                    assert answer.status == 200, await answer.text()
                    document: dict[str, Any] = await answer.json()
                    return document

            before = await scans()
            views = await asyncio.gather(*(view(p) for p in ["/-/api/spend"] * 10 + ["/-/budgets"] * 5))
            assert await scans() - before == 1  # one budget, a small keyspace: one SCAN call
            await view("/-/api/spend")
            assert await scans() - before == 1  # still fresh
    finally:
        await redis.aclose()
    bars = [(row["subject"], row["spent_usd"]) for row in views[0]["budgets"]]
    assert bars == [("alice", 0.3)]
    assert all(v["budgets"] == views[-1]["budgets"] for v in views[10:])
