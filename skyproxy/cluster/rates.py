"""Shared rate limits: the leaky buckets of `RATE_CHECK`, one round trip per request.

A request's buckets are the same from one request to the next but for the user: a
`RatePlan` holds the script call encoded once, less the user id in the user buckets'
keys, and a check joins the user's id in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from skyproxy.cluster import resp
from skyproxy.cluster.backend import Bucket, RateDecision, RatePlan
from skyproxy.cluster.connection import RedisConnection, ScriptArg, key_part
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

    def plan(self, buckets: Sequence[Bucket]) -> RatePlan:
        """The script wants the user buckets first: KEYS, then ARGV (how many are user
        buckets, and per bucket its max_rate, period and max_wait)."""
        users = tuple(b._replace(user="") for b in buckets if b.user is not None)
        ordered = users + tuple(b for b in buckets if b.user is None)
        args: list[ScriptArg] = [len(users)]
        for b in ordered:
            args += (b.max_rate, b.period, 0 if b.user is not None else b.max_wait)
        after = b"".join([*(resp.bulk(self.key(b)) for b in ordered[len(users) :]), *map(resp.bulk, args)])
        prefixes = tuple(self.key(b).encode() for b in users)
        items = 1 + len(ordered) + len(args)  # the count of keys, the keys, the arguments
        return RatePlan(ordered, (items, resp.count(len(ordered)), prefixes, after))

    async def check_plan(self, plan: RatePlan, user: str) -> RateDecision:
        items, before, prefixes, after = plan.encoded
        part = key_part(user).encode()
        data = b"".join((before, *[resp.bulk(prefix + part) for prefix in prefixes], after))
        return await self._decide(resp.Tail(items, data), len(plan.buckets))

    async def check(self, buckets: Sequence[Bucket]) -> RateDecision:
        """Each bucket as it is, users and all; the decision in the caller's order."""
        if not buckets:
            return _ALLOWED
        order = [i for i, b in enumerate(buckets) if b.user is not None]
        users = len(order)
        order += [i for i, b in enumerate(buckets) if b.user is None]
        args: list[ScriptArg] = [users]
        for i in order:
            b = buckets[i]
            args += (b.max_rate, b.period, 0 if b.user is not None else b.max_wait)
        keys = [self.key(buckets[i]) for i in order]
        decision = await self._decide(resp.tail(keys, args), len(buckets))
        levels = [0.0] * len(buckets)
        for position, i in enumerate(order):
            levels[i] = decision.levels[position]
        refused = decision.refused_by
        return decision._replace(refused_by=None if refused is None else order[refused], levels=tuple(levels))

    async def _decide(self, call: resp.Tail, count: int) -> RateDecision:
        """The script's answer, in the script's order of the buckets."""
        try:
            raw = await self._connection.run_tail(self._check, call)
        except ClusterUnavailable:
            if self._connection.fails_open:
                return RateDecision(True, None, 0.0, 0.0, (0.0,) * count, unchecked=True)
            raise
        refusing = raw[1]
        # allowed, refused_by, retry_after, delay, levels
        return RateDecision(
            raw[0] == 1,
            refusing - 1 if refusing else None,
            float(raw[2]),
            float(raw[3]),
            tuple(map(float, raw[4:])),
        )

    async def refund(self, buckets: Sequence[Bucket]) -> None:
        if not buckets:
            return
        keys = [self.key(b) for b in buckets]
        args: list[ScriptArg] = [b.per_second for b in buckets]
        with contextlib.suppress(ClusterUnavailable):
            await self._connection.run(self._refund, keys, args)
