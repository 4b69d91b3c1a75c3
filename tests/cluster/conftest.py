"""Fixtures for the cluster tests: real redis-server processes and replicas' nodes on them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from helpers import Daemon, env_config, free_port, wait_healthy, write_config
from helpers.redis_server import RedisServer, redis_binary

from skyproxy.cluster.node import ClusterNode
from skyproxy.cluster.url import RedisURL
from skyproxy.config import ClusterSettings


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Starts redis-servers (optionally with a password); stops them all at the end."""
    binary = redis_binary()
    servers: list[RedisServer] = []

    def start(password: str | None = None) -> RedisServer:
        server = RedisServer(binary, tmp_path / f"redis-{len(servers)}", password)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def redis_server(start_redis: Callable[..., RedisServer]) -> RedisServer:
    return start_redis()


@pytest.fixture
async def make_node() -> AsyncIterator[Callable[..., object]]:
    """Builds started `ClusterNode`s, each with its own pool, as separate replicas would."""
    nodes: list[ClusterNode] = []

    async def make(
        url: str,
        *,
        on_error: str = "closed",
        timeout_ms: float = 1000,
        prefix: str = "test:",
        **leases: float,
    ) -> ClusterNode:
        settings = ClusterSettings(on_error=on_error, redis_url=url, timeout_ms=timeout_ms, prefix=prefix)  # type: ignore[arg-type]
        node = ClusterNode(settings, RedisURL(url), **leases)
        await node.start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.close()


CLUSTER_TABLE = """
[cluster]
redis = "env:SKYPROXY_REDIS_URL"
on_error = "{on_error}"
timeout_ms = {timeout_ms}
prefix = "{prefix}"
"""


@pytest.fixture
def start_replicas(tmp_path: Path, run_daemon: Callable[..., Daemon]) -> Callable[..., list[Daemon]]:
    """Starts replicas of `skyproxy serve`: one config each, alike but for the port."""

    def start(
        redis_url: str,
        *,
        count: int = 3,
        on_error: str = "closed",
        rules: str = "",
        timeout_ms: int = 200,
        prefix: str = "replicas:",
        upstream: str = "mock",
        extra: Callable[[Path], str] | None = None,
    ) -> list[Daemon]:
        """`extra(folder)` adds tables to a replica's config, written in its own folder."""
        daemons = []
        cluster = CLUSTER_TABLE.format(on_error=on_error, timeout_ms=timeout_ms, prefix=prefix)
        key = "" if upstream == "mock" else 'key = "env:SKYPROXY_TEST_KEY"'
        for _ in range(count):
            folder = tmp_path / f"replica-{len(list(tmp_path.glob('replica-*')))}"
            folder.mkdir()
            port = free_port()
            tables = cluster + (extra(folder) if extra is not None else "")
            body = env_config(upstream, key=key, listen=f"127.0.0.1:{port}", rules=rules, extra=tables)
            path = write_config(folder, body)
            daemons.append(run_daemon(path, port, env={"SKYPROXY_REDIS_URL": redis_url}, wait=False))
        for daemon in daemons:
            wait_healthy(daemon)
        return daemons

    return start
