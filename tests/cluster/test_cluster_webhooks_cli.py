"""`skyproxy webhooks list | replay` with [cluster]: the shared outbox, not the local store."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import skyproxy_command, write_config
from helpers.redis_server import RedisServer

from skyproxy.webhooks.shared import SharedWebhooks
from skyproxy.webhooks.stats import WebhookStats
from skyproxy.webhooks.store import Route

PASSWORD = "pw-canary-0b7d2f9e4a6c8e1d3f5a"
CONFIG = """
[environments.dev]
listen = ["127.0.0.1:1"]
upstream = "mock"
[webhooks]
signing_secret = "file:state/whsec"
[cluster]
redis = "env:SKYPROXY_REDIS_URL"
on_error = "closed"
prefix = "cli:"
"""


def run(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SKYPROXY_REDIS_URL": url}
    return subprocess.run([*skyproxy_command(), *args], capture_output=True, text=True, timeout=60, env=env)


async def test_list_shows_every_replicas_pending_deliveries_and_replay_is_refused(
    start_redis: Callable[..., RedisServer], make_node: Callable[..., Any], tmp_path: Path
) -> None:
    server = start_redis(password=PASSWORD)
    config = write_config(tmp_path, CONFIG)
    nodes = [await make_node(server.url, prefix="cli:") for _ in range(2)]
    receiver, other = (SharedWebhooks(n.webhooks, WebhookStats(), fails_open=False) for n in nodes)
    route = Route("r" * 24, "dev", "http://127.0.0.1:9/hook", None, "alice", "req-1", 1_700_000_000.0)
    await receiver.share_route(route)
    first = await receiver.receive("dev", route.id, b'{"id":"p1"}', "application/json", "p1", None, 0)
    second = await receiver.receive("dev", route.id, b'{"id":"p2"}', "application/json", "p2", None, 0)
    # Another replica claims one: the receiving replica's store knows of neither.
    held = await other.due(0, (), (), 1)
    [claimed] = [d.event_id for d in held.due]

    listed = run(server.url, "webhooks", "list", "--json", "-c", str(config))
    assert listed.returncode == 0, listed.stderr
    items = {item["id"]: item for item in map(json.loads, listed.stdout.splitlines())}
    assert set(items) == {first.event_id, second.event_id}
    for event_id, item in items.items():
        assert (item["environment"], item["target"], item["status"], item["attempts"]) == (
            "dev",
            "http://127.0.0.1:9/hook",
            "pending",
            0,
        )
        assert item["lastError"] == ("being delivered by a replica" if event_id == claimed else None)
    assert "[cluster]" in listed.stderr
    assert run(server.url, "webhooks", "list", "--status", "dead", "-c", str(config)).stdout.count("\n") == 1

    replay = run(server.url, "webhooks", "replay", first.event_id, "-c", str(config))
    assert replay.returncode != 0
    assert "[cluster]" in replay.stderr

    server.stop()
    down = run(server.url, "webhooks", "list", "-c", str(config))
    assert down.returncode != 0
    assert f"127.0.0.1:{server.port}" in down.stderr
    for text in (listed.stdout, listed.stderr, replay.stderr, down.stdout, down.stderr):
        assert PASSWORD not in text
        assert PASSWORD[-12:] not in text
