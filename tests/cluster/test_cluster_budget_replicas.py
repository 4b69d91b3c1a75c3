"""`Budgets` on the cluster's Redis, two replicas' worth in one process: admission, spend and
warn_at follow every replica's creates, not this replica's alone."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import skyproxy_command, write_config
from helpers.daemon import eventually
from helpers.redis_server import RedisServer

from skyproxy.budgets.enforce import NO_HOLD, Budgets, Exceeded
from skyproxy.budgets.shared import SharedHold
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


SHOW_CONFIG = """
[environments.dev]
listen = ["127.0.0.1:1"]
upstream = "mock"
[[budgets]]
name = "daily"
per = "user"
usd = 1.0
period = "day"
[cluster]
redis = "env:SKYPROXY_REDIS_URL"
on_error = "closed"
prefix = "test:"
"""


async def test_budget_show_reads_every_replicas_figures_from_redis(
    start_redis: Callable[..., RedisServer], make_node: Make, tmp_path: Path
) -> None:
    password = "pw-canary-5d1e9a3c7b2f4e6a8c0d"
    server = start_redis(password=password)
    a, b = await replica(make_node, server), await replica(make_node, server)
    hold = await a.admit_shared("dev", "alice", None, 0.3)
    create(a, "p1", 0.3)
    hold.release()
    await b.admit_shared("dev", "alice", None, 0.2)  # in flight on b: reserved
    await b.admit_shared("dev", "a:b%c", None, 0.1)  # a subject that needs escaping in keys
    await b.admit_shared("dev", None, None, 0.05)  # no user header
    assert b.shared is not None
    await b.shared.stop()
    assert a.shared is not None
    await a.shared.stop()
    config = write_config(tmp_path, SHOW_CONFIG)
    env = {**os.environ, "SKYPROXY_REDIS_URL": server.url}
    shown = subprocess.run(
        [*skyproxy_command(), "budget", "show", "--json", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["source"] == f"Redis redis://127.0.0.1:{server.port}/0 (every replica)"
    rows = {row["subject"]: (row["spent_usd"], row["reserved_usd"]) for row in report["budgets"]}
    assert rows == {"alice": (0.3, 0.2), "a:b%c": (0.0, 0.1), None: (0.0, 0.05)}
    assert {row["resets_at"][-10:] for row in report["budgets"]} == {"T00:00:00Z"}
    assert password not in shown.stdout + shown.stderr
