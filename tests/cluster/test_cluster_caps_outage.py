"""In-flight caps and budgets when the shared Redis is down: on_error decides, once per outage."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from helpers import env_config
from helpers.access import Recorder, all_logs, log_text
from helpers.daemon import CREATE, eventually
from helpers.redis_server import RedisServer

CAPPED = (
    '[rate_limit]\nuser_header = "X-User-Id"\n'
    '[[rate_limit.rules]]\nname = "predictions"\nmethods = ["POST"]\npaths = ["/v1/predictions"]\n'
    "max_in_flight = 1\n"
)
BUDGET = (
    "[rate_limit]\nenabled = false\n"
    "[pricing]\ntruefusion-pro = 0.3\n"
    '[[budgets]]\nname = "daily"\nper = "user"\nusd = 1.0\nperiod = "day"\n'
)


def cluster(server: RedisServer, on_error: str) -> str:
    return f'[cluster]\nredis = "{server.url}"\non_error = "{on_error}"\ntimeout_ms = 200\nprefix = "o:"\n'


async def post(proxy: Any) -> tuple[int, Any]:
    async with proxy.session.post(
        f"{proxy.url}/v1/predictions", json=CREATE, headers={"X-User-Id": "alice"}
    ) as r:
        return r.status, await r.json(content_type=None)


@pytest.mark.parametrize(
    "rules", [CAPPED, BUDGET.replace("usd = 1.0", "usd = 100.0")], ids=["in_flight", "budget"]
)
@pytest.mark.parametrize("on_error", ["closed", "open"])
async def test_redis_down_refuses_or_serves_as_on_error_says(
    canary_env: str,
    redis_server: RedisServer,
    start_proxy: Callable[..., Any],
    raw_upstream: Callable[..., Any],
    on_error: str,
    rules: str,
) -> None:
    upstream = Recorder()
    url = await raw_upstream(upstream.app())
    with all_logs() as records:
        proxy = await start_proxy(env_config(url, rules=rules, extra=cluster(redis_server, on_error)))
        assert (await post(proxy))[0] == 201
        redis_server.stop()
        answers = [await post(proxy) for _ in range(5)]
        node = proxy.state.cluster
        if on_error == "closed":
            assert {(s, b["error"]["code"]) for s, b in answers} == {(503, "limits_unavailable")}
            assert upstream.creates == 1
        else:
            assert {s for s, _ in answers} == {201}
            assert upstream.creates == 6
        assert node.connection.errors_total >= 5
        assert node.degraded
        redis_server.start()
        await eventually(lambda: not node.degraded, "Redis back", deadline_s=5)
        assert (await post(proxy))[0] == 201
    text = log_text(records)
    assert text.count("is unavailable") == 1, text
    assert text.count("is back after") == 1, text


async def test_one_replica_on_redis_admits_exactly_what_the_budget_holds(
    canary_env: str,
    redis_server: RedisServer,
    start_proxy: Callable[..., Any],
    raw_upstream: Callable[..., Any],
) -> None:
    upstream = Recorder(hold=asyncio.Event())
    url = await raw_upstream(upstream.app())
    proxy = await start_proxy(env_config(url, rules=BUDGET, extra=cluster(redis_server, "closed")))
    creates = [asyncio.create_task(post(proxy)) for _ in range(6)]
    await eventually(lambda: upstream.creates == 3 and sum(t.done() for t in creates) == 3, "3 held")
    assert upstream.hold is not None
    upstream.hold.set()
    assert sorted(s for s, _ in await asyncio.gather(*creates)) == [201, 201, 201, 402, 402, 402]
