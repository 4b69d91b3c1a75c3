"""The budget views of a replica when Redis does not answer: an honest error, or this
replica's own figures labelled as such; never a hang, never the Redis password."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
from helpers import Daemon
from helpers.redis_server import RedisServer

Replicas = Callable[..., list[Daemon]]
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
