"""Webhook counters, bumped on the event loop and read when metrics or status are asked for."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class WebhookStats:
    received: int = 0  # verified and newly stored
    refused_signature: int = 0
    duplicates: int = 0
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    gone: int = 0
    outbox_depth: int = 0  # pending deliveries, as of the relay's last look at the store
    oldest_queued_at: float | None = None  # wall clock

    def oldest_pending_age(self, now: float | None = None) -> float | None:
        if self.oldest_queued_at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.oldest_queued_at)
