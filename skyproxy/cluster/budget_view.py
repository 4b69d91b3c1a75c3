"""`skyproxy budget show` with [cluster]: every replica's spend and reservations, from Redis.

A daemon's `/-/budgets` knows its own audit lines only; with [cluster] the figures that
admit or refuse a create are in Redis, so the CLI reads them there.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from skyproxy.cluster.backend import BudgetScope, Usage
from skyproxy.cluster.budgets import RedisBudgets
from skyproxy.cluster.connection import RedisConnection
from skyproxy.cluster.url import RedisURL, resolve_url
from skyproxy.config import ClusterSettings

__all__ = ["SharedUsage", "shared_usage"]

_CLI_TIMEOUT_MS = 5000.0  # a CLI may wait longer than a request would
_MARK = "\x00"  # stands in for the subject while the key pattern is built
_GLOB = str.maketrans({c: "\\" + c for c in "*?[]\\"})


@dataclass(frozen=True, slots=True)
class SharedUsage:
    budget: str
    subject: str  # as Redis keys name it (see budgets.enforce.subject_key)
    usage: Usage


async def shared_usage(
    settings: ClusterSettings,
    windows: Sequence[tuple[str, str]],
    environ: Mapping[str, str] = os.environ,
    *,
    url: RedisURL | None = None,
) -> tuple[str, list[SharedUsage]]:
    """(Redis as shown: host and database, every subject's usage of each (budget, period
    label) there); `ClusterUnavailable` when Redis does not answer. `url`, if given, is
    used as is: a daemon's, whose key source must not be read again on its event loop."""
    if url is None:
        url = resolve_url(settings, environ)
    connection = RedisConnection(
        url,
        # An outage it meets is logged with what it means for the daemon (in /-/budgets and
        # the dashboard), so with the daemon's on_error.
        on_error=settings.on_error,
        timeout_ms=max(settings.timeout_ms, _CLI_TIMEOUT_MS),
        prefix=settings.prefix,
    )
    try:
        budgets = RedisBudgets(connection)
        found = []
        for name, label in windows:
            before, after = connection.key("budget", name, _MARK, label).split(_MARK)
            pattern = before.translate(_GLOB) + "*" + after.translate(_GLOB)
            keys = await connection.call(functools.partial(_scan, pattern=pattern))
            for key in sorted(keys):
                subject = key[len(before) : len(key) - len(after)]
                if ":" in subject:
                    continue  # not a state key of this window
                subject = subject.replace("%3A", ":").replace("%25", "%")
                usage = await budgets.usage(BudgetScope(name, subject, label, 0.0, 0.0))
                found.append(SharedUsage(name, subject, usage))
        return url.shown, found
    finally:
        await connection.close()


async def _scan(redis: Redis, pattern: str) -> list[str]:
    found = []
    async for key in redis.scan_iter(match=pattern, count=1000):
        found.append(key.decode() if isinstance(key, bytes) else str(key))
    return found
