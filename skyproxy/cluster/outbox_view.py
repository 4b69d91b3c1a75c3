"""`skyproxy webhooks list` with [cluster]: the shared outbox in Redis, read from the CLI.

With [cluster] a replica's store holds its routes only: events and their deliveries live
in Redis, where any replica may have received or claimed them, and a delivered or dead
event is removed. So the listing comes from Redis, and it holds pending deliveries only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from skyproxy.cluster.connection import RedisConnection
from skyproxy.cluster.url import resolve_url
from skyproxy.cluster.webhooks import RedisWebhooks
from skyproxy.config import ClusterSettings

__all__ = ["SharedDelivery", "shared_deliveries"]

# A CLI may wait longer than a request would: nothing is held up meanwhile.
_CLI_TIMEOUT_MS = 5000.0


@dataclass(frozen=True, slots=True)
class SharedDelivery:
    id: str
    environment: str | None  # None when its route has expired
    target: str | None
    attempts: int
    received_at: float
    claimed: bool  # a replica is delivering it now


async def shared_deliveries(
    settings: ClusterSettings, limit: int, environ: Mapping[str, str] = os.environ
) -> list[SharedDelivery]:
    """The outbox's deliveries, newest first; raises `ClusterUnavailable` when Redis does not answer."""
    connection = RedisConnection(
        resolve_url(settings, environ),
        on_error="closed",
        timeout_ms=max(settings.timeout_ms, _CLI_TIMEOUT_MS),
        prefix=settings.prefix,
    )
    try:
        outbox = RedisWebhooks(connection)
        environments: dict[str, str | None] = {}
        found = []
        for item in await outbox.queued(limit):
            due = _fields(item.payload)
            route_id = due.get("route_id")
            environment = None
            if isinstance(route_id, str):
                if route_id not in environments:
                    environments[route_id] = _environment(await outbox.get_route(route_id))
                environment = environments[route_id]
            target = due.get("target")
            attempts = due.get("attempts")
            found.append(
                SharedDelivery(
                    item.event_id,
                    environment,
                    target if isinstance(target, str) else None,
                    attempts if isinstance(attempts, int) else 0,
                    item.queued_at,
                    item.claimed,
                )
            )
        return found
    finally:
        await connection.close()


def _fields(raw: bytes | None) -> dict[str, Any]:
    try:
        data = orjson.loads(raw or b"null")
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _environment(route: bytes | None) -> str | None:
    environment = _fields(route).get("environment")
    return environment if isinstance(environment, str) else None
