"""`Budgets` on the cluster's Redis, two replicas' worth in one process: admission, spend and
warn_at follow every replica's creates, not this replica's alone."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers.daemon import eventually
from helpers.redis_server import RedisServer

from skyproxy.budgets.enforce import NO_HOLD, Budgets, Exceeded, SharedHold
from skyproxy.config import Budget

Make = Callable[..., Any]
DAILY = Budget("daily", "user", 1.0, "day", warn_at=0.5)


async def replica(make_node: Make, server: RedisServer) -> Budgets:
    budgets = Budgets((DAILY,))
    budgets.shared = (await make_node(server.url)).budgets
    return budgets


def create(budgets: Budgets, prediction_id: str, cost: float, user: str = "alice") -> None:
    """A created line, as the audit writes it after the upstream answered."""
    budgets.record(time.time(), "dev", user, None, "created", prediction_id, cost)


async def test_spend_on_one_replica_refuses_on_another_and_warns_there_too(
    redis_server: RedisServer, make_node: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "skyproxy.budgets")
    a, b = await replica(make_node, redis_server), await replica(make_node, redis_server)
    for n in range(2):
        hold = await a.admit_shared("dev", "alice", None, 0.3)
        assert isinstance(hold, SharedHold)
        create(a, f"p{n}", 0.3)
        hold.release()  # in the same step, as the handler's finally does

    async def b_is_refused_on_the_spend() -> bool:
        refused = await b.admit_shared("dev", "alice", None, 0.5)
        assert isinstance(refused, Exceeded)  # reserved or spent, 0.6 leaves no room for 0.5
        return (refused.spent_usd, refused.reserved_usd) == (0.6, 0.0)

    await eventually(b_is_refused_on_the_spend, "0.6 spent on a refuses 0.5 more on b")
    # b warns on the shared spend, though none of it was b's, once per subject and period.
    assert a.warnings == {"daily": 1}  # from its own lines
    held = [await b.admit_shared("dev", "alice", None, 0.1) for _ in range(2)]
    assert b.warnings == {"daily": 1}
    assert all(isinstance(h, SharedHold) for h in held)
    warned = [r for r in caplog.records if "budget daily" in r.getMessage()]
    assert len(warned) == 2
    # Bob's budget is his own.
    assert isinstance(await b.admit_shared("dev", "bob", None, 1.0), SharedHold)


async def test_no_budget_no_redis_call(redis_server: RedisServer, make_node: Make) -> None:
    budgets = Budgets(())
    node = await make_node(redis_server.url)
    budgets.shared = node.budgets
    redis_server.stop()
    assert await budgets.admit_shared("dev", "alice", None, 1.0) is NO_HOLD
    budgets.record(time.time(), "dev", "alice", None, "created", "p1", 1.0)
    assert node.connection.errors_total == 0
