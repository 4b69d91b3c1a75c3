"""The terminal audit line, once per prediction across replicas: the first to claim it writes it."""

from __future__ import annotations

from skyproxy.cluster.connection import RedisConnection
from skyproxy.cluster.errors import ClusterUnavailable

__all__ = ["DEFAULT_TTL_S", "RedisTerminals"]

# Longer than any client keeps polling one prediction; the claim then expires on its own.
DEFAULT_TTL_S = 7 * 86_400


class RedisTerminals:
    """A shared SET NX on the prediction id, beside each replica's own `Tracker`."""

    def __init__(self, connection: RedisConnection, ttl_s: int = DEFAULT_TTL_S) -> None:
        self._connection = connection
        self._ttl_s = ttl_s

    async def first(self, prediction_id: str) -> bool:
        """True for exactly one caller per prediction while Redis answers.

        With Redis unavailable it answers True whatever `on_error` says: a terminal line
        written twice can be told apart by its prediction id, a line never written is lost."""
        key = self._connection.key("terminal", prediction_id)
        try:
            claimed = await self._connection.call(lambda redis: redis.set(key, b"1", nx=True, ex=self._ttl_s))
        except ClusterUnavailable:
            return True
        return bool(claimed)
