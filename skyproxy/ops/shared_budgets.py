"""Every replica's budget figures from Redis, for `/-/budgets` and the dashboard's bars.

A read SCANs Redis for each budget's subjects: the Redis that answers every replica's
rate checks within `timeout_ms`. So one read serves every caller for `FRESH_S`, however
many dashboards poll, and callers that come while a read is under way share it. A
failed read is kept as long, so a Redis that is away is not asked again (nor its
outage logged again) on every poll.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from skyproxy.config import Settings

if TYPE_CHECKING:  # redis-py is imported only where [cluster] is on
    from skyproxy.cluster.node import ClusterNode

FRESH_S = 5.0
Report = tuple[str, list[dict[str, Any]]]


class _Reads:
    __slots__ = ("at", "outcome", "pending")

    def __init__(self) -> None:
        self.at = -math.inf
        self.outcome: Report | BaseException | None = None
        self.pending: asyncio.Future[None] | None = None


_reads: WeakKeyDictionary[ClusterNode, _Reads] = WeakKeyDictionary()  # one per daemon


async def shared_report(settings: Settings, node: ClusterNode) -> Report:
    """(where the figures come from, one row per budget and subject), at most `FRESH_S`
    old; raises `ClusterUnavailable` when Redis did not answer the last read."""
    reads = _reads.setdefault(node, _Reads())
    if reads.outcome is None or time.monotonic() - reads.at >= FRESH_S:
        if reads.pending is None:
            reads.pending = asyncio.ensure_future(_read(settings, node, reads))
        await asyncio.wait({reads.pending})  # a caller that leaves does not cancel the others' read
    outcome = reads.outcome
    if isinstance(outcome, BaseException):
        raise outcome
    assert outcome is not None
    return outcome


async def _read(settings: Settings, node: ClusterNode, reads: _Reads) -> None:
    from skyproxy.budgets.show import shared_report as read  # urllib and Redis: only here

    try:
        reads.outcome = await read(settings, node.connection.url)  # the URL resolved at start
    except Exception as exc:  # kept and raised to each caller: ClusterUnavailable, mostly
        reads.outcome = exc
    finally:
        reads.at = time.monotonic()
        reads.pending = None
