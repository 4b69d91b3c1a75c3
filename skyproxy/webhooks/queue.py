"""Where the receiver puts events and the relay takes deliveries from.

On one replica that is the SQLite store, through `StoreReceipts` and `StoreQueue`; with
[cluster] it is the shared outbox (shared.py), so that any replica can receive an event
and any replica can deliver it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from skyproxy.webhooks.store import Outbox, Receipt, Store, StoreThread

__all__ = ["DeliveryQueue", "Receipts", "StoreQueue", "StoreReceipts"]


class Receipts(Protocol):
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
        """Stores a verified event and queues its delivery, unless it is a duplicate."""
        ...


class DeliveryQueue(Protocol):
    async def due(
        self, now: float, skip_events: Sequence[str], skip_origins: Sequence[str], limit: int
    ) -> Outbox:
        """Deliveries to attempt now, except those in flight or to origins at their cap."""
        ...

    async def delivered(self, event_id: str, attempts: int) -> None: ...

    async def dead(self, event_id: str, attempts: int, error: str) -> None: ...

    async def retry(self, event_id: str, attempts: int, next_at: float, error: str) -> None: ...

    async def gone(self, route_id: str, event_id: str, attempts: int, error: str, now: float) -> int:
        """Marks the route gone and its pending deliveries; returns how many."""
        ...


class StoreReceipts:
    """`Receipts` in this replica's store."""

    def __init__(self, db: StoreThread) -> None:
        self._db = db

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
        return await self._db.run(
            Store.receive, environment, route_id, body, content_type, prediction_id, event, now
        )


class StoreQueue:
    """`DeliveryQueue` in this replica's store."""

    def __init__(self, db: StoreThread) -> None:
        self._db = db

    async def due(
        self, now: float, skip_events: Sequence[str], skip_origins: Sequence[str], limit: int
    ) -> Outbox:
        return await self._db.run(Store.outbox, now, tuple(skip_events), tuple(skip_origins), limit)

    async def delivered(self, event_id: str, attempts: int) -> None:
        await self._db.run(Store.delivered, event_id, attempts)

    async def dead(self, event_id: str, attempts: int, error: str) -> None:
        await self._db.run(Store.dead, event_id, attempts, error)

    async def retry(self, event_id: str, attempts: int, next_at: float, error: str) -> None:
        await self._db.run(Store.retry, event_id, attempts, next_at, error)

    async def gone(self, route_id: str, event_id: str, attempts: int, error: str, now: float) -> int:
        return await self._db.run(Store.gone, route_id, event_id, attempts, error, now)
