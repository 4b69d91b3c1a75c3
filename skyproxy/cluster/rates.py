"""Shared rate limits: the leaky buckets of `RATE_CHECK`, one round trip per request.

A check's call is encoded from pieces kept per bucket shape (environment, rule, rate):
the key up to the user id and the rate's arguments. A user's bucket adds its id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from skyproxy.cluster import resp
from skyproxy.cluster.backend import Bucket, RateDecision
from skyproxy.cluster.connection import RedisConnection, ScriptArg, key_part
from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.cluster.scripts import RATE_CHECK, RATE_REFUND

__all__ = ["RedisRates"]

_ALLOWED = RateDecision(True, None, 0.0, 0.0, ())
_SHAPES_KEPT = 1024  # bucket shapes come from the config: a reload or two's worth
_Shape = tuple[str, str, bool, int, float, float]


class RedisRates:
    """`RateBackend` on Redis: exact across replicas, clocked by Redis."""

    def __init__(self, connection: RedisConnection) -> None:
        self._connection = connection
        self._check = connection.script(RATE_CHECK)
        self._refund = connection.script(RATE_REFUND)
        self._shapes: dict[_Shape, tuple[bytes, bytes]] = {}

    def key(self, bucket: Bucket) -> str:
        # The rate is part of the name, so a reload that changes it starts the bucket empty.
        rate = f"{bucket.max_rate}/{bucket.period:g}"
        if bucket.user is None:
            return self._connection.key("rate", bucket.environment, bucket.rule, rate, "env")
        return self._connection.key("rate", bucket.environment, bucket.rule, rate, "user", bucket.user)

    def _encoded(self, bucket: Bucket) -> tuple[bytes, bytes]:
        """The bucket's key and its arguments, as the script call carries them."""
        b, user = bucket, bucket.user
        shape = (b.environment, b.rule, user is None, b.max_rate, b.period, b.max_wait)
        kept = self._shapes.get(shape)
        if kept is None:
            kept = self._shapes[shape] = self._shape(bucket)
        key, args = kept
        if user is None:
            return key, args
        return resp.bulk(key + key_part(user).encode()), args

    def _shape(self, bucket: Bucket) -> tuple[bytes, bytes]:
        """An environment bucket's encoded key, or a user bucket's key up to the user id;
        and the encoded max_rate, period and max_wait."""
        if len(self._shapes) >= _SHAPES_KEPT:
            self._shapes.clear()
        if bucket.user is None:
            key, max_wait = resp.bulk(self.key(bucket)), bucket.max_wait
        else:
            key, max_wait = self.key(bucket._replace(user="")).encode(), 0
        return key, b"".join(map(resp.bulk, (bucket.max_rate, bucket.period, max_wait)))

    def _call(self, buckets: Sequence[Bucket]) -> tuple[resp.Tail, list[int]]:
        """The script call, and the caller's index of each bucket in the order the
        script wants them: the user buckets first."""
        order: list[int] = []
        keys: list[bytes] = []
        args: list[bytes] = []
        users = 0
        for i, bucket in enumerate(buckets):
            key, encoded = self._encoded(bucket)
            if bucket.user is None:
                order.append(i)
                keys.append(key)
                args.append(encoded)
            else:
                order.insert(users, i)
                keys.insert(users, key)
                args.insert(users, encoded)
                users += 1
        count = len(order)
        # KEYS, then ARGV: how many are user buckets, and three arguments per bucket.
        data = b"".join((resp.count(count), *keys, resp.count(users), *args))
        return resp.Tail(2 + 4 * count, data), order

    async def check(self, buckets: Sequence[Bucket]) -> RateDecision:
        if not buckets:
            return _ALLOWED
        call, order = self._call(buckets)
        try:
            raw = await self._connection.run_tail(self._check, call)
        except ClusterUnavailable:
            if self._connection.fails_open:
                return RateDecision(True, None, 0.0, 0.0, (0.0,) * len(buckets), unchecked=True)
            raise
        levels = [0.0] * len(buckets)
        for position, i in enumerate(order):
            levels[i] = float(raw[4 + position])
        refusing = int(raw[1])
        refused_by = order[refusing - 1] if refusing else None
        # allowed, refused_by, retry_after, delay, levels
        return RateDecision(raw[0] == 1, refused_by, float(raw[2]), float(raw[3]), tuple(levels))

    async def refund(self, buckets: Sequence[Bucket]) -> None:
        if not buckets:
            return
        keys = [self.key(b) for b in buckets]
        args: list[ScriptArg] = [b.per_second for b in buckets]
        with contextlib.suppress(ClusterUnavailable):
            await self._connection.run(self._refund, keys, args)
