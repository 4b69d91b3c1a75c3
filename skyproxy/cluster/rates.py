"""Shared rate limits: the leaky buckets of `RATE_CHECK`, one round trip per request."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from skyproxy.cluster.backend import Bucket, RateDecision
from skyproxy.cluster.connection import RedisConnection, ScriptArg
from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.cluster.scripts import RATE_CHECK, RATE_REFUND

__all__ = ["RedisRates"]

_ALLOWED = RateDecision(True, None, 0.0, 0.0, ())


class RedisRates:
    """`RateBackend` on Redis: exact across replicas, clocked by Redis."""

    def __init__(self, connection: RedisConnection) -> None:
        self._connection = connection
        self._check = connection.script(RATE_CHECK)
        self._refund = connection.script(RATE_REFUND)

    def key(self, bucket: Bucket) -> str:
        # The rate is part of the name, so a reload that changes it starts the bucket empty.
        rate = f"{bucket.max_rate}/{bucket.period:g}"
        if bucket.user is None:
            return self._connection.key("rate", bucket.environment, bucket.rule, rate, "env")
        return self._connection.key("rate", bucket.environment, bucket.rule, rate, "user", bucket.user)

    async def check(self, buckets: Sequence[Bucket]) -> RateDecision:
        if not buckets:
            return _ALLOWED
        # The script wants the user buckets first; answers are mapped back to the caller's order.
        order = [i for i, b in enumerate(buckets) if b.user is not None]
        users = len(order)
        order += [i for i, b in enumerate(buckets) if b.user is None]
        keys = [self.key(buckets[i]) for i in order]
        args: list[ScriptArg] = [users]
        for i in order:
            bucket = buckets[i]
            args += (bucket.max_rate, bucket.period, bucket.max_wait if bucket.user is None else 0)
        try:
            raw = await self._connection.run(self._check, keys, args)
        except ClusterUnavailable:
            if self._connection.fails_open:
                return RateDecision(True, None, 0.0, 0.0, (0.0,) * len(buckets), unchecked=True)
            raise
        levels = [0.0] * len(buckets)
        for position, i in enumerate(order):
            levels[i] = float(raw[4 + position])
        refusing = int(raw[1])
        return RateDecision(
            allowed=raw[0] == 1,
            refused_by=order[refusing - 1] if refusing else None,
            retry_after=float(raw[2]),
            delay=float(raw[3]),
            levels=tuple(levels),
        )

    async def refund(self, buckets: Sequence[Bucket]) -> None:
        if not buckets:
            return
        keys = [self.key(b) for b in buckets]
        args: list[ScriptArg] = [b.per_second for b in buckets]
        with contextlib.suppress(ClusterUnavailable):
            await self._connection.run(self._refund, keys, args)
