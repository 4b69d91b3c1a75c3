"""A replica's shared budget views use the Redis URL the daemon resolved at start.

The URL's key source (a keyring over D-Bus, a file, a credential) is blocking work done
once, in a thread, before binding. `/-/budgets` and the dashboard's bars, polled every
two seconds while a dashboard is open, must not read it again on the event loop: here
the source is taken away once the daemon runs, and both views still read Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from helpers import Daemon, env_config, free_port, write_config
from helpers.redis_server import RedisServer

BUDGET = (
    '[pricing]\ntruefusion-pro = 0.3\n[[budgets]]\nname = "daily"\nper = "user"\nusd = 1.0\nperiod = "day"\n'
)
PASSWORD = "pw-canary-5d1f0a7c3e9b2d4f6a8c"


async def test_the_views_read_redis_without_reading_the_url_source_again(
    tmp_path: Path, start_redis: Callable[..., RedisServer], run_daemon: Callable[..., Daemon]
) -> None:
    server = start_redis(password=PASSWORD)
    secret = tmp_path / "redis-url"
    secret.write_text(server.url)
    secret.chmod(0o600)
    cluster = f'[cluster]\nredis = "file:{secret}"\non_error = "closed"\ntimeout_ms = 500\n'
    port = free_port()
    path = write_config(tmp_path, env_config("mock", listen=f"127.0.0.1:{port}", rules=BUDGET, extra=cluster))
    daemon = run_daemon(path, port)
    secret.unlink()  # resolved at start; a view must not need it again
    headers = {"X-User-Id": "alice"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        create = {"model": "truefusion-pro", "input": {"prompt": "a cat"}}
        async with session.post(f"{daemon.url}/v1/predictions", json=create, headers=headers) as answer:
            assert answer.status in (200, 201), await answer.text()
        async with session.get(f"{daemon.url}/-/budgets") as answer:
            text = await answer.text()
            assert answer.status == 200, text
            rows: dict[str, Any] = await answer.json()
        async with session.get(f"{daemon.url}/-/api/spend") as answer:
            spend_text = await answer.text()
            assert answer.status == 200, spend_text
            document: dict[str, Any] = await answer.json()
    assert f"127.0.0.1:{server.port}" in rows["source"] and "every replica" in rows["source"]
    assert [(r["budget"], r["subject"]) for r in rows["budgets"]] == [("daily", "alice")]
    assert document["budgets_source"] == rows["source"]
    for shown in (text, spend_text, daemon.stderr()):
        assert PASSWORD not in shown


async def test_a_view_that_finds_redis_down_does_not_say_the_daemon_refuses(
    start_redis: Callable[..., RedisServer], start_replicas: Callable[..., list[Daemon]]
) -> None:
    """Under on_error = "open" the daemon serves on through an outage; a dashboard polling
    its bars must not log that it refuses limited requests."""
    server = start_redis()
    (replica,) = start_replicas(server.url, count=1, rules=BUDGET, on_error="open")
    server.stop()
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{replica.url}/-/api/spend") as answer,
    ):
        assert answer.status == 200
        document: dict[str, Any] = await answer.json()
    assert document["budgets_source"] == "this replica (Redis did not answer)"
    assert "is unavailable" in replica.stderr()  # the view's failure is logged, before its answer
    assert "refusing limited requests" not in replica.stderr()
