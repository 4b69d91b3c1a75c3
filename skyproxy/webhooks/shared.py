"""Webhooks shared by replicas: routes, receipts and the outbox on the cluster's Redis.

With [cluster], Skytells' callback reaches whichever replica the load balancer picks,
so that replica must know a route another one recorded; the same event received twice,
by any replicas, is relayed once; and a delivery whose replica died is finished by
another. So routes, receipts and deliveries live in the shared outbox
(`skyproxy.cluster.webhooks`), and this replica's store keeps only its own routes.

A delivery is claimed for a short lease, renewed while its attempt runs. A replica that
dies mid-attempt stops renewing; the lease runs out and another replica delivers it,
with the same webhook-id, so an app that deduplicates on webhook-id sees it once.

Receiving raises `ClusterUnavailable` (the receiver answers 503 and Skytells sends the
event again later). The relay's calls never raise: while Redis is away it finds no work,
and an outcome it cannot record leaves the claim to run out and the delivery to be tried
again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

import orjson

from skyproxy.cluster.backend import WebhookClaims, WebhookRoutes
from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.webhooks import targets
from skyproxy.webhooks.stats import WebhookStats
from skyproxy.webhooks.store import Due, Outbox, Receipt, Route, new_event_id

__all__ = ["SharedWebhooks"]

ROUTE_TTL_S = 7 * 86_400.0  # a route outlives any prediction it may be called back for
SEEN_TTL_S = 7 * 86_400.0  # how long a received body counts as a duplicate
FULL_ORIGIN_DELAY_S = 1.0  # a claim given back because its origin is at its cap


class SharedOutbox(WebhookClaims, WebhookRoutes, Protocol):
    """The cluster's webhook state: `skyproxy.cluster.webhooks.RedisWebhooks`."""


class SharedWebhooks:
    """`Receipts` and `DeliveryQueue` on the shared outbox, and the routes' shared copies."""

    def __init__(self, outbox: SharedOutbox, stats: WebhookStats, *, fails_open: bool) -> None:
        self._outbox = outbox
        self._stats = stats
        self._fails_open = fails_open
        self._held: dict[str, Due] = {}  # claims this replica holds, renewed until settled
        self._renewer: asyncio.Task[None] | None = None

    # -- routes -----------------------------------------------------------------------------
    async def share_route(self, route: Route) -> None:
        """Makes a new route known to every replica; under "open" a failure leaves it local."""
        try:
            await self._outbox.put_route(route.id, _encode_route(route), ROUTE_TTL_S)
        except ClusterUnavailable:
            if not self._fails_open:
                raise

    async def route(self, route_id: str) -> Route | None:
        raw = await self._outbox.get_route(route_id)
        if raw is None:
            return None
        return replace(_decode_route(raw), gone=await self._is_gone(route_id))

    async def _is_gone(self, route_id: str) -> bool:
        return await self._outbox.get_route(route_id + ".gone") is not None

    # -- receiving --------------------------------------------------------------------------
    async def receive(
        self,
        environment: str,
        route_id: str,
        body: bytes,
        content_type: str,
        prediction_id: str | None,
        event: str | None,
        now: float,
    ) -> Receipt:
        route = await self.route(route_id)
        if route is None or route.environment != environment:
            return Receipt("unknown_route")
        event_id = new_event_id()
        due = Due(event_id, route.id, route.target, targets.origin_of(route.target), body, content_type, 0)
        key = f"{environment}:{route_id}:{hashlib.sha256(body).hexdigest()}"
        payload = None if route.gone else _encode_due(due)  # a gone route: seen, never sent
        if not await self._outbox.accept(key, SEEN_TTL_S, event_id, payload):
            return Receipt("duplicate", route)
        return Receipt("stored", route, event_id)

    # -- the relay's queue ------------------------------------------------------------------
    async def due(
        self, now: float, skip_events: Sequence[str], skip_origins: Sequence[str], limit: int
    ) -> Outbox:
        try:
            claims = await self._outbox.claim_due(limit) if limit > 0 else []
            outlook = await self._outbox.outlook()
        except ClusterUnavailable:  # logged once by the connection; no work until it is back
            return Outbox((), None, self._stats.outbox_depth, self._stats.oldest_queued_at)
        ready: list[Due] = []
        origins: set[str] = set()
        for claim in claims:
            if claim.event_id in skip_events:
                continue  # this replica's own attempt, still running: its claim is held again
            due = _decode_due(claim.payload)
            self._held[due.event_id] = due
            if await self._gone_now(due):
                continue
            if due.origin in skip_origins:
                await self._give_back(due.event_id, FULL_ORIGIN_DELAY_S)
            elif due.origin in origins:
                await self._give_back(due.event_id, 0.0)  # one per origin and round: the cap holds
            else:
                origins.add(due.origin)
                ready.append(due)
        next_at = None if outlook.next_due_in is None else now + outlook.next_due_in
        oldest = None if outlook.oldest_age is None else time.time() - outlook.oldest_age
        return Outbox(tuple(ready), next_at, outlook.depth, oldest)

    async def delivered(self, event_id: str, attempts: int) -> None:
        await self._settle(event_id, "finish")

    async def dead(self, event_id: str, attempts: int, error: str) -> None:
        await self._settle(event_id, "finish")

    async def retry(self, event_id: str, attempts: int, next_at: float, error: str) -> None:
        due = self._held.get(event_id)
        payload = _encode_due(replace(due, attempts=attempts)) if due is not None else None
        await self._settle(event_id, "reschedule", max(0.0, next_at - time.time()), payload)

    async def gone(self, route_id: str, event_id: str, attempts: int, error: str, now: float) -> int:
        with contextlib.suppress(ClusterUnavailable):
            await self._outbox.put_route(route_id + ".gone", b"1", ROUTE_TTL_S)
        await self._settle(event_id, "finish")
        return 1  # the route's other deliveries are dropped as they are claimed

    async def _gone_now(self, due: Due) -> bool:
        """Drops a delivery whose route answered 410 since it was queued (on any replica)."""
        try:
            gone = await self._is_gone(due.route_id)
        except ClusterUnavailable:
            gone = False  # the attempt finds out; its outcome is recorded when Redis is back
        if gone:
            await self._settle(due.event_id, "finish")
            self._stats.gone += 1
        return gone

    # -- claims -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._outbox.lease_s / 3)
            for event_id in list(self._held):
                with contextlib.suppress(ClusterUnavailable):
                    if not await self._outbox.renew(event_id):
                        self._held.pop(event_id, None)  # lost: another replica has it now

    async def _give_back(self, event_id: str, delay: float) -> None:
        await self._settle(event_id, "reschedule", delay)

    async def _settle(
        self, event_id: str, step: str, delay: float = 0.0, payload: bytes | None = None
    ) -> None:
        self._held.pop(event_id, None)
        with contextlib.suppress(ClusterUnavailable):  # the claim runs out; it is tried again
            if step == "finish":
                await self._outbox.finish(event_id)
            else:
                await self._outbox.reschedule(event_id, delay, payload)


def _encode_route(route: Route) -> bytes:
    return orjson.dumps(
        {
            "id": route.id,
            "environment": route.environment,
            "target": route.target,
            "events": route.events,
            "user_id": route.user_id,
            "request_id": route.request_id,
            "created_at": route.created_at,
        }
    )


def _decode_route(raw: bytes) -> Route:
    data = orjson.loads(raw)
    events = data["events"]
    return Route(
        id=data["id"],
        environment=data["environment"],
        target=data["target"],
        events=tuple(events) if events is not None else None,
        user_id=data["user_id"],
        request_id=data["request_id"],
        created_at=data["created_at"],
    )


def _encode_due(due: Due) -> bytes:
    return orjson.dumps(
        {
            "event_id": due.event_id,
            "route_id": due.route_id,
            "target": due.target,
            "origin": due.origin,
            "body": base64.b64encode(due.body).decode("ascii"),
            "content_type": due.content_type,
            "attempts": due.attempts,
        }
    )


def _decode_due(raw: bytes) -> Due:
    data = orjson.loads(raw)
    return Due(
        event_id=data["event_id"],
        route_id=data["route_id"],
        target=data["target"],
        origin=data["origin"],
        body=base64.b64decode(data["body"]),
        content_type=data["content_type"],
        attempts=data["attempts"],
    )
