"""Webhook state shared by replicas: deduplication, routes, and an outbox with claims.

Every replica receives webhooks (a load balancer picks one) and every replica relays
them. An event is queued once; a replica claims due events for one lease at a time and
then finishes, reschedules or renews each one. A claim whose replica died runs out with
its lease, and the event is due again for another replica, with the same event id, so a
receiver that deduplicates on webhook-id sees one delivery.

These calls raise `ClusterUnavailable` whatever `on_error` says: a receiver must not
answer 2xx for an event it could not store, nor a relay take a delivery it could not claim.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from skyproxy.cluster.backend import Claim, Outlook
from skyproxy.cluster.connection import RedisConnection, ScriptArg
from skyproxy.cluster.scripts import (
    OUTBOX_ACCEPT,
    OUTBOX_CLAIM,
    OUTBOX_ENQUEUE,
    OUTBOX_LIST,
    OUTBOX_OUTLOOK,
    OUTBOX_STEP,
)

__all__ = ["DEFAULT_CLAIM_LEASE_S", "Queued", "RedisWebhooks"]

DEFAULT_CLAIM_LEASE_S = 10.0  # renewed while an attempt runs; a dead replica's claim runs out


@dataclass(frozen=True, slots=True)
class Queued:
    """One delivery in the outbox, as `webhooks list` shows it."""

    event_id: str
    payload: bytes
    queued_at: float  # Unix time, on Redis' clock
    claimed: bool  # a replica holds it now (its claim has not run out)


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


class RedisWebhooks:
    """`WebhookClaims` and `WebhookRoutes` on Redis, claiming as one owner (this replica)."""

    def __init__(
        self,
        connection: RedisConnection,
        *,
        claim_lease_s: float = DEFAULT_CLAIM_LEASE_S,
        owner: str | None = None,
    ) -> None:
        self._connection = connection
        self.owner = owner or f"{os.getpid()}-{os.urandom(6).hex()}"
        self.lease_s = claim_lease_s
        self._lease_ms = max(1, _ms(claim_lease_s))
        key = connection.key
        self._outbox = [
            key("webhooks", "due"),
            key("webhooks", "body"),
            key("webhooks", "owner"),
            key("webhooks", "queued"),
        ]
        self._enqueue = connection.script(OUTBOX_ENQUEUE)
        self._accept = connection.script(OUTBOX_ACCEPT)
        self._outlook = connection.script(OUTBOX_OUTLOOK)
        self._claim = connection.script(OUTBOX_CLAIM)
        self._step = connection.script(OUTBOX_STEP)
        self._list = connection.script(OUTBOX_LIST)

    async def first_seen(self, key: str, ttl_s: float) -> bool:
        name = self._connection.key("webhooks", "seen", key)
        first = await self._connection.call(
            lambda redis: redis.set(name, b"1", nx=True, px=max(1, _ms(ttl_s)))
        )
        return bool(first)

    async def put_route(self, route_id: str, route: bytes, ttl_s: float) -> None:
        name = self._connection.key("webhooks", "route", route_id)
        await self._connection.call(lambda redis: redis.set(name, route, px=max(1, _ms(ttl_s))))

    async def get_route(self, route_id: str) -> bytes | None:
        name = self._connection.key("webhooks", "route", route_id)
        value = await self._connection.call(lambda redis: redis.get(name))
        return None if value is None else bytes(value, "utf-8") if isinstance(value, str) else value

    async def enqueue(self, event_id: str, payload: bytes, delay_s: float = 0.0) -> bool:
        args: list[ScriptArg] = [event_id, payload, _ms(delay_s)]
        added = await self._connection.run(self._enqueue, self._outbox, args)
        return int(added) == 1

    async def accept(self, key: str, ttl_s: float, event_id: str, payload: bytes | None) -> bool:
        seen = self._connection.key("webhooks", "seen", key)
        args: list[ScriptArg] = [event_id, payload or b"", max(1, _ms(ttl_s))]
        first = await self._connection.run(self._accept, [*self._outbox, seen], args)
        return int(first) == 1

    async def outlook(self) -> Outlook:
        depth, next_due, oldest = await self._connection.run(self._outlook, self._outbox, [])
        return Outlook(
            int(depth),
            None if int(next_due) < 0 else int(next_due) / 1000,
            None if int(oldest) < 0 else int(oldest) / 1000,
        )

    async def claim_due(self, limit: int) -> list[Claim]:
        args: list[ScriptArg] = [self.owner, self._lease_ms, limit]
        raw = await self._connection.run(self._claim, self._outbox, args)
        return [Claim(raw[i].decode(), bytes(raw[i + 1])) for i in range(0, len(raw), 2)]

    async def renew(self, event_id: str) -> bool:
        return await self._next_step(event_id, "renew", self._lease_ms)

    async def reschedule(self, event_id: str, delay_s: float, payload: bytes | None = None) -> bool:
        return await self._next_step(event_id, "reschedule", _ms(delay_s), payload or b"")

    async def finish(self, event_id: str) -> bool:
        return await self._next_step(event_id, "finish", 0)

    async def depth(self) -> int:
        return (await self.outlook()).depth

    async def _next_step(self, event_id: str, step: str, ms: int, payload: bytes = b"") -> bool:
        args: list[ScriptArg] = [event_id, self.owner, step, ms, payload]
        done = await self._connection.run(self._step, self._outbox, args)
        return int(done) == 1

    async def queued(self, limit: int) -> list[Queued]:
        """Up to `limit` deliveries in the outbox, claimed or not, newest first."""
        raw = await self._connection.run(self._list, self._outbox, [max(1, limit)])
        now = int(raw[0])
        found = []
        for i in range(1, len(raw), 5):
            event_id, payload, queued_ms, due_ms, owner = raw[i : i + 5]
            claimed = bool(owner) and float(due_ms) > now
            found.append(Queued(event_id.decode(), bytes(payload), float(queued_ms) / 1000, claimed))
        return found
