"""Fixtures for the cluster tests: real redis-server processes and replicas' nodes on them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
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
