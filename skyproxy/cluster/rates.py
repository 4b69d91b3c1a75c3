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
        users = tuple(b._replace(user="") for b in buckets if b.user is not None)
        return self._encoded(users + tuple(b for b in buckets if b.user is None), len(users), whole=False)

    def _encoded(self, ordered: tuple[Bucket, ...], users: int, whole: bool) -> RatePlan:
        """The script wants the user buckets first: KEYS, then ARGV (how many are user
        buckets, and per bucket its max_rate, period and max_wait). `whole`: the user
        buckets' keys with their users, else up to the user id."""
        args: list[ScriptArg] = [users]
        for b in ordered:
            args += (b.max_rate, b.period, 0 if b.user is not None else b.max_wait)
        keyed = ordered if whole else ordered[users:]
        after = b"".join([*(resp.bulk(self.key(b)) for b in keyed), *map(resp.bulk, args)])
        prefixes = () if whole else tuple(self.key(b).encode() for b in ordered[:users])
        items = 1 + len(ordered) + len(args)  # the count of keys, the keys, the arguments
        return RatePlan(ordered, (items, resp.count(len(ordered)), prefixes, after))

    async def check_plan(self, plan: RatePlan, user: str) -> RateDecision:
        items, data, prefixes, after = plan.encoded
        if len(prefixes) == 1:  # the usual plan: one rule per user
            key = prefixes[0] + key_part(user).encode()
            data = b"%b$%d\r\n%b\r\n%b" % (data, len(key), key, after)
        elif prefixes:
            part = key_part(user).encode()
            data = b"".join((data, *[resp.bulk(prefix + part) for prefix in prefixes], after))
        else:
            data += after
        try:
            raw = await self._connection.run_tail(self._check, resp.Tail(items, data))
        except ClusterUnavailable:
            if self._connection.fails_open:
                return RateDecision(True, None, 0.0, 0.0, (0.0,) * len(plan.buckets), unchecked=True)
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

    async def check(self, buckets: Sequence[Bucket]) -> RateDecision:
        """Each bucket as it is, users and all; the decision in the caller's order."""
        if not buckets:
            return _ALLOWED
        order = [i for i, b in enumerate(buckets) if b.user is not None]
        users = len(order)
        order += [i for i, b in enumerate(buckets) if b.user is None]
        decision = await self.check_plan(
            self._encoded(tuple(buckets[i] for i in order), users, whole=True), ""
        )
        levels = [0.0] * len(buckets)
        for position, i in enumerate(order):
            levels[i] = decision.levels[position]
        refused = decision.refused_by
        return decision._replace(refused_by=None if refused is None else order[refused], levels=tuple(levels))

    async def refund(self, buckets: Sequence[Bucket]) -> None:
        if not buckets:
            return
        keys = [self.key(b) for b in buckets]
        args: list[ScriptArg] = [b.per_second for b in buckets]
        with contextlib.suppress(ClusterUnavailable):
            await self._connection.run(self._refund, keys, args)
